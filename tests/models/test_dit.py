"""The DiT core: adaLN-Zero init, parameter counts, patching, position embedding, guidance, attention."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from ditlab.models.attention import Attention, attention_map
from ditlab.models.dit import DiT, modulate


@pytest.fixture(scope="module")
def make_dit(tiny_dit):
    """This file's DiT (4 channels, 3 blocks of 4 heads, 5 classes) as adaLN-Zero leaves it; ``std=0.1``
    randomises the zero-initialised layers."""
    return partial(tiny_dit, in_channels=4, depth=3, num_heads=4, num_classes=5, std=0.0)


# --- initialisation -------------------------------------------------------------------------------


def test_init_output_is_exactly_zero_and_blocks_are_identity(make_dit, dit_inputs, randomize_zero_init):
    dit = make_dit()
    x, t, y = dit_inputs(dit)
    out = dit(x, t, y)
    assert out.shape == (3, 8, 8, 8)  # learn_sigma doubles the channels
    assert torch.count_nonzero(out) == 0
    tokens, cond = dit.embed(x, t, y)
    assert torch.count_nonzero(tokens) > 0 and torch.count_nonzero(cond) > 0
    for block in dit.blocks:
        assert torch.equal(block(tokens, cond), tokens)
    # sanity: the same blocks stop being the identity once their gates are non-zero
    randomize_zero_init(dit)
    assert not torch.allclose(dit.blocks[0](tokens, cond), tokens)
    assert torch.count_nonzero(dit(x, t, y)) > 0


def test_one_backward_at_init_only_reaches_final_linear(make_dit, dit_inputs):
    dit = make_dit().train()
    x, t, y = dit_inputs(dit)
    dit(x, t, y).pow(2).add(dit(x, t, y)).sum().backward()
    nonzero = {
        name for name, p in dit.named_parameters() if p.grad is not None and torch.count_nonzero(p.grad) > 0
    }
    assert nonzero == {"final_layer.linear.weight", "final_layer.linear.bias"}
    assert dit.pos_embed.grad is None and not dit.pos_embed.requires_grad


@pytest.mark.parametrize(("preset", "expected"), [("XL/2", 675_129_632), ("S/2", 32_963_360)])
def test_parameter_count_matches_paper(preset, expected):
    with torch.device("meta"):
        dit = DiT.from_preset(preset)
    assert sum(p.numel() for p in dit.parameters()) == expected


def analytic_param_count(depth: int, hidden: int, patch: int, channels: int = 4, classes: int = 1000,
                         grid: int = 16, mlp_ratio: int = 4) -> int:  # fmt: skip
    d = hidden
    block = (
        (3 * d * d + 3 * d) + (d * d + d) + (2 * mlp_ratio * d * d + mlp_ratio * d + d) + (6 * d * d + 6 * d)
    )
    out = patch * patch * 2 * channels
    return (channels * patch * patch * d + d  # patch embed
            + grid * grid * d  # frozen position embedding
            + 256 * d + d + d * d + d  # timestep MLP
            + (classes + 1) * d  # label table with null row
            + depth * block
            + 2 * d * d + 2 * d + d * out + out)  # fmt: skip


def test_parameter_count_formula_agrees_with_module(make_dit):
    dit = make_dit(depth=2, hidden_size=48, num_heads=3, patch_size=4, input_size=16)
    expected = analytic_param_count(2, 48, 4, classes=5, grid=4)
    assert sum(p.numel() for p in dit.parameters()) == expected
    assert analytic_param_count(28, 1152, 2) == 675_129_632
    assert analytic_param_count(12, 384, 2) == 32_963_360


# --- patching and positions -----------------------------------------------------------------------


@pytest.mark.parametrize(("patch", "channels"), [(1, 3), (2, 4), (4, 8)])
def test_patchify_unpatchify_roundtrip(patch, channels, make_dit):
    dit = make_dit(patch_size=patch, in_channels=channels, input_size=8)
    images = torch.randn(2, channels, 8, 8)
    patches = dit.patchify(images)
    assert patches.shape == (2, (8 // patch) ** 2, patch * patch * channels)
    assert torch.equal(dit.unpatchify(patches), images)
    # patch n holds pixel block (row n // G, column n % G): the same order as the conv patch embedding
    grid = 8 // patch
    n = grid + 1 if grid > 1 else 0
    row, col = divmod(n, grid)
    block = images[0, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch]
    assert torch.equal(patches[0, n], block.permute(1, 2, 0).reshape(-1))


def closed_form_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Token n = (row i, column j), row-major; first dim/2 columns encode j, the rest encode i."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(grid, dtype=torch.float64).repeat_interleave(grid)  # i = n // grid
    cols = torch.arange(grid, dtype=torch.float64).repeat(grid)  # j = n % grid
    embed = torch.empty(grid * grid, dim, dtype=torch.float64)
    for k in range(quarter):
        embed[:, k] = torch.sin(cols * omega[k])
        embed[:, quarter + k] = torch.cos(cols * omega[k])
        embed[:, 2 * quarter + k] = torch.sin(rows * omega[k])
        embed[:, 3 * quarter + k] = torch.cos(rows * omega[k])
    return embed


@pytest.mark.parametrize(("hidden", "input_size", "patch"), [(32, 8, 2), (384, 32, 2), (64, 16, 4)])
def test_pos_embed_matches_closed_form(hidden, input_size, patch, make_dit):
    dit = make_dit(hidden_size=hidden, input_size=input_size, patch_size=patch, depth=1)
    grid = input_size // patch
    assert dit.pos_embed.shape == (1, grid * grid, hidden)
    expected = closed_form_pos_embed(hidden, grid).float()
    torch.testing.assert_close(dit.pos_embed[0], expected, atol=1e-6, rtol=0)
    # spot values: token 0 is all sin(0)=0 / cos(0)=1; token 1 is column 1, row 0
    assert torch.equal(dit.pos_embed[0, 0, : hidden // 4], torch.zeros(hidden // 4))
    assert math.isclose(dit.pos_embed[0, 1, 0].item(), math.sin(1.0), abs_tol=1e-6)
    assert math.isclose(dit.pos_embed[0, 1, hidden // 2].item(), 0.0, abs_tol=1e-7)


# --- conditioning and guidance --------------------------------------------------------------------


def test_cfg_with_scale_one_equals_conditional_output(make_dit, dit_inputs):
    dit = make_dit(std=0.1)
    x, t, y = dit_inputs(dit)
    conditional = dit(x, t, y)
    unconditional = dit(x, t, torch.full_like(y, dit.num_classes))
    assert not torch.allclose(conditional, unconditional)  # the label matters
    torch.testing.assert_close(dit.forward_with_cfg(x, t, y, 1.0), conditional, atol=1e-5, rtol=1e-5)
    # w = 0 gives the unconditional output; w = 3 extrapolates on the guided channels only
    torch.testing.assert_close(dit.forward_with_cfg(x, t, y, 0.0), torch.cat(
        [unconditional[:, :4], conditional[:, 4:]], dim=1), atol=1e-5, rtol=1e-5)  # fmt: skip
    guided = dit.forward_with_cfg(x, t, y, 3.0, cfg_channels=3)
    expected = unconditional[:, :3] + 3.0 * (conditional[:, :3] - unconditional[:, :3])
    torch.testing.assert_close(guided[:, :3], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[:, 3:], conditional[:, 3:], atol=1e-5, rtol=1e-5)
    # scalar t is broadcast
    torch.testing.assert_close(dit.forward_with_cfg(x, t[0], y, 2.0),
                               dit.forward_with_cfg(x, t[0].expand(3), y, 2.0), atol=1e-6, rtol=0)  # fmt: skip


def test_class_dropout_one_gives_null_labels(make_dit, dit_inputs):
    dit = make_dit(class_dropout_prob=1.0, std=0.1)
    labels = torch.arange(5).repeat(20)
    assert torch.equal(dit.y_embedder.drop(labels), torch.full_like(labels, 5))
    x, t, _ = dit_inputs(dit, 4)
    y = torch.tensor([0, 1, 2, 3])
    dit.train()
    dropped = dit(x, t, y)
    dit.eval()
    torch.testing.assert_close(dropped, dit(x, t, torch.full_like(y, 5)), atol=0, rtol=0)
    assert not torch.allclose(dit(x, t, y), dropped)


def test_class_dropout_rate_and_eval_mode(make_dit):
    dit = make_dit(class_dropout_prob=0.25)
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = dit.y_embedder.drop(labels, generator=torch.Generator().manual_seed(0))
    assert abs((dropped == 5).float().mean().item() - 0.25) < 0.02
    dit.eval()
    table = dit.y_embedder.embedding_table.weight
    torch.testing.assert_close(dit.y_embedder(torch.tensor([1, 2])), table[[1, 2]], atol=0, rtol=0)
    assert make_dit(class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 5


def test_timestep_embedding_depends_on_t(make_dit, dit_inputs):
    dit = make_dit(std=0.1)
    x, _, y = dit_inputs(dit)
    assert not torch.allclose(dit(x, torch.full((3,), 10.0), y), dit(x, torch.full((3,), 900.0), y))
    torch.testing.assert_close(
        dit(x, torch.tensor(10.0), y), dit(x, torch.full((3,), 10.0), y), atol=0, rtol=0
    )


def test_modulate():
    tokens, shift, scale = torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4)
    expected = tokens * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(modulate(tokens, shift, scale), expected)


# --- presets and validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "depth", "hidden", "heads", "patch"),
    [
        ("S/2", 12, 384, 6, 2),
        ("DiT-B/4", 12, 768, 12, 4),
        ("SiT-L/8", 24, 1024, 16, 8),
        ("XL", 28, 1152, 16, 2),
    ],
)
def test_from_preset_names(name, depth, hidden, heads, patch):
    with torch.device("meta"):
        dit = DiT.from_preset(name)
    assert (dit.depth, dit.patch_size, dit.blocks[0].attn.num_heads) == (depth, patch, heads)
    assert dit.config.hidden_size == hidden and dit.config.depth == depth


def test_from_preset_overrides():
    dit = DiT.from_preset("S/2", input_size=16, in_channels=1, depth=2, num_classes=10, learn_sigma=False)
    assert (dit.input_size, dit.in_channels, dit.out_channels, dit.depth, dit.num_classes) == (
        16,
        1,
        1,
        2,
        10,
    )
    assert dit.config.hidden_size == 384
    assert dit(torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 9])).shape == (2, 1, 16, 16)
    rebuilt = DiT(dit.config)
    assert rebuilt.config == dit.config
    with pytest.raises(ValueError, match="unknown DiT preset.*choices"):
        DiT.from_preset("M/2")


def test_clear_errors_for_bad_shapes(make_dit):
    with pytest.raises(ValueError, match="input_size=10 is not divisible by patch_size=4"):
        DiT(input_size=10, patch_size=4, hidden_size=32, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=5)
    with pytest.raises(ValueError, match="divisible by 4"):
        DiT(input_size=8, patch_size=2, hidden_size=30, depth=1, num_heads=3)
    dit = make_dit()
    with pytest.raises(ValueError, match="8x8 inputs got"):
        dit(torch.randn(1, 4, 10, 10), torch.zeros(1), torch.zeros(1, dtype=torch.long))


# --- attention ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "heads", "length"), [(32, 4, 16), (48, 3, 7)])
def test_explicit_attention_map_equals_fused_path(dim, heads, length):
    torch.manual_seed(0)
    attention = Attention(dim, heads)
    tokens = torch.randn(2, length, dim)
    fused, none = attention(tokens)
    explicit, weights = attention(tokens, return_map=True)
    assert none is None
    assert weights.shape == (2, heads, length, length)
    torch.testing.assert_close(explicit, fused, atol=1e-6, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, heads, length), atol=1e-6, rtol=0)
    assert (weights >= 0).all()
    # the map is the textbook softmax(q k^T / sqrt(d))
    q, k = torch.randn(1, 2, 5, 8, dtype=torch.float64), torch.randn(1, 2, 5, 8, dtype=torch.float64)
    logits = torch.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(8)
    torch.testing.assert_close(attention_map(q, k), logits.exp() / logits.exp().sum(-1, keepdim=True))


def test_block_attention_return_matches_plain_block(make_dit, dit_inputs):
    dit = make_dit(std=0.1)
    tokens, cond = dit.embed(*dit_inputs(dit))
    plain = dit.blocks[1](tokens, cond)
    with_map, weights = dit.blocks[1](tokens, cond, return_attention=True)
    torch.testing.assert_close(with_map, plain, atol=1e-6, rtol=0)
    assert weights.shape == (3, 4, 16, 16)


def test_unknown_attention_kind(make_dit):
    with pytest.raises(ValueError, match="unknown attention kind 'nope'; registered: \\[.*'full'"):
        make_dit(attention="nope")
    with pytest.raises(ValueError, match="unknown mlp kind 'nope'; registered: \\[.*'dense'"):
        make_dit(mlp="nope")


# --- explicit widths (what width pruning leaves) ----------------------------------------------------


def test_default_widths_leave_config_and_parameter_names_unchanged(make_dit, dit_inputs):
    dit = make_dit()
    assert dit.config.head_dim is None and dit.config.mlp_hidden is None
    explicit = make_dit(head_dim=8, mlp_hidden=128)  # the defaults for hidden 32, 4 heads, ratio 4
    assert explicit.config == dit.config
    assert {k: v.shape for k, v in explicit.state_dict().items()} == {
        k: v.shape for k, v in dit.state_dict().items()
    }
    torch.testing.assert_close(explicit(*dit_inputs(explicit)), dit(*dit_inputs(dit)), atol=0, rtol=0)


def test_explicit_head_dim_and_mlp_hidden_shape_the_block_and_rebuild_from_config(make_dit, dit_inputs):
    dit = make_dit(num_heads=2, head_dim=8, mlp_hidden=40, std=0.1)
    block = dit.blocks[0]
    assert block.attn.qkv.weight.shape == (3 * 2 * 8, 32) and block.attn.proj.weight.shape == (32, 16)
    assert block.mlp.fc1.weight.shape == (40, 32) and block.mlp.fc2.weight.shape == (32, 40)
    assert dit.config.head_dim == 8 and dit.config.mlp_hidden == 40
    rebuilt = DiT(dit.config)
    rebuilt.load_state_dict(dit.state_dict())  # strict
    x, t, y = dit_inputs(dit)
    assert torch.equal(rebuilt.eval()(x, t, y), dit(x, t, y))
    tokens, cond = dit.embed(x, t, y)
    fused = block(tokens, cond)
    explicit, weights = block(tokens, cond, return_attention=True)
    assert weights.shape == (3, 2, 16, 16)
    torch.testing.assert_close(explicit, fused, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="head_dim=0 must be a positive integer"):
        make_dit(head_dim=0)


def test_network_config_builds_explicit_widths():
    from ditlab.models.config import DiTConfig

    config = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=3,
                           head_dim=8, mlp_hidden=24, num_classes=3)  # fmt: skip
    dit = config.build()
    assert dit.blocks[0].attn.qkv.weight.shape == (72, 32) and dit.blocks[0].mlp.fc1.out_features == 24
    assert DiTConfig.from_dict(dit.config.to_dict()).build().config == dit.config
