"""The efficient attention operators: exact reductions to full attention, masks, pooling, Hyena's identity
form, block-sparse coverage, the Hilbert order, and one-line refusals of bad options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ditlab.models  # noqa: F401 - registers the operators
from ditlab.models.config import DiTConfig
from ditlab.models.operators.block_sparse import BlockSparseAttention, block_mass
from ditlab.models.operators.hierarchical import HierarchicalAttention
from ditlab.models.operators.hilbert import hilbert_permutation, inverse_permutation
from ditlab.models.operators.hyena import HyenaMixer
from ditlab.models.operators.local import LocalAttention, pool_grid
from ditlab.models.operators.window import WindowAttention


def qkv(num_tokens: int = 36, batch: int = 2, heads: int = 2, head_dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, num_tokens, head_dim, generator=generator) for _ in range(3)]


def full(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("kernel", ["gather", "dense", "auto"])
def test_radius_covering_the_grid_is_full_attention(kernel):
    q, k, v = qkv(36)  # 6x6 grid: the farthest pair is 5^2 + 5^2 = 50 < 8^2
    out = LocalAttention(radius=8, kernel=kernel)(q, k, v)
    torch.testing.assert_close(out, full(q, k, v), atol=1e-5, rtol=1e-5)


def test_a_smaller_radius_is_not_full_attention_and_paths_agree():
    q, k, v = qkv(64)
    gathered = LocalAttention(radius=2.5, kernel="gather")(q, k, v)
    dense = LocalAttention(radius=2.5, kernel="dense")(q, k, v)
    torch.testing.assert_close(gathered, dense, atol=1e-5, rtol=1e-5)
    assert (gathered - full(q, k, v)).abs().max() > 1e-2


def test_flex_block_masks_match_the_dense_mask_and_are_built_per_grid():
    operator = LocalAttention(radius=2.5, pool=2, kernel="flex")  # the pooled tokens ride along as extra keys
    reference = LocalAttention(radius=2.5, pool=2, kernel="dense")
    with torch.no_grad():  # eager flex_attention has no CPU backward; CUDA runs it compiled
        for tokens in (64, 16):
            q, k, v = qkv(tokens)
            torch.testing.assert_close(operator(q, k, v), reference(q, k, v), atol=1e-5, rtol=1e-5)
    assert sorted(key[0] for key in operator._block_masks) == [16, 64]


@pytest.mark.parametrize("radius", [1, 2, 2.5, 3])
def test_key_counts_are_lattice_points_clipped_at_borders(radius):
    side = 7
    operator = LocalAttention(radius=radius)
    counts = operator.key_counts(side * side).view(side, side)
    for i in range(side):
        for j in range(side):
            expected = sum(1 for a in range(side) for b in range(side) if (i - a) ** 2 + (j - b) ** 2 < radius**2)
            assert counts[i, j] == expected
    mask = operator.mask(side * side, torch.device("cpu"))
    assert torch.equal(mask, mask.T)  # the image-image mask is symmetric


def test_pooled_keys_with_uniform_weights_are_average_pooling():
    operator = LocalAttention(radius=2, pool=2)
    k = qkv(64)[1]
    pooled = pool_grid(k, operator.pool_weight, 8, 8)
    grid = k.permute(0, 1, 3, 2).reshape(4, 8, 8, 8)
    expected = F.avg_pool2d(grid, 2).reshape(2, 2, 8, 16).permute(0, 1, 3, 2)
    torch.testing.assert_close(pooled, expected)
    assert operator.pool_weight.requires_grad


def test_pooled_local_attention_paths_agree_and_weights_get_gradients():
    q, k, v = qkv(64)
    gathered = LocalAttention(radius=2, pool=4, kernel="gather")
    dense = LocalAttention(radius=2, pool=4, kernel="dense")
    out = gathered(q, k, v)
    torch.testing.assert_close(out, dense(q, k, v), atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert gathered.pool_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["2d", "raster"])
def test_window_of_at_least_n_is_full_attention(layout):
    q, k, v = qkv(16)
    torch.testing.assert_close(WindowAttention(window=16, layout=layout)(q, k, v), full(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["2d", "raster"])
def test_small_window_matches_its_explicit_mask(layout):
    q, k, v = qkv(36)
    operator = WindowAttention(window=1, layout=layout, kernel="gather")
    coords = [(n // 6, n % 6) for n in range(36)]
    if layout == "2d":
        mask = torch.tensor([[abs(a[0] - b[0]) <= 1 and abs(a[1] - b[1]) <= 1 for b in coords] for a in coords])
    else:
        mask = torch.tensor([[abs(a - b) <= 1 for b in range(36)] for a in range(36)])
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(operator(q, k, v), expected, atol=1e-5, rtol=1e-5)
    weights = operator.map(q, k)
    torch.testing.assert_close(weights @ v, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["raster", "2d"])
def test_hyena_y_at_init_is_its_identity_form(layout):
    q, k, v = qkv(16)
    for variant in ("y", "x", "se"):
        out = HyenaMixer(2 * 8, variant=variant, layout=layout)(q, k, v)
        torch.testing.assert_close(out, q * k * v)


def test_hyena_raster_filter_is_causal():
    q, k, v = qkv(16)
    mixer = HyenaMixer(16, variant="se", layout="raster")
    with torch.no_grad():
        for conv in (mixer.input_conv, mixer.inner_conv):
            conv.weight.normal_()
    base = mixer(q, k, v)
    k2 = k.clone()
    k2[:, :, 10] += 1.0
    changed = (mixer(q, k2, v) - base).abs().sum(dim=(0, 1, 3))
    assert changed[:10].max() == 0 and changed[10:].max() > 0


def test_block_sparse_at_full_coverage_is_dense():
    q, k, v = qkv(64)
    operator = BlockSparseAttention(coverage=1.0, block_size=8, search_every=3)
    operator(q, k, v)  # search
    torch.testing.assert_close(operator(q, k, v), full(q, k, v), atol=1e-5, rtol=1e-5)  # reuse, all blocks kept
    assert operator.keep.all()


def test_block_mass_rows_sum_to_the_block_size_and_low_coverage_is_sparse(monkeypatch):
    q, k, v = qkv(64)
    mass = block_mass(q, k, 8)
    monkeypatch.setattr("ditlab.models.operators.block_sparse.MASS_CHUNK_ELEMENTS", 8 * 64)  # one query block a chunk
    torch.testing.assert_close(block_mass(q, k, 8), mass)
    torch.testing.assert_close(mass.sum(dim=-1), torch.full(mass.shape[:-1], 8.0))
    operator = BlockSparseAttention(coverage=0.5, block_size=8, search_every=2)
    operator(q, k, v)
    kept = operator.keep
    assert 0 < kept.sum() < kept.numel()
    kept_mass = (mass * kept).sum(dim=-1)
    assert (kept_mass >= 0.5 * 8 - 1e-4).all()
    reused = operator(q, k, v)  # the kept blocks only: differs from dense, equals its masked form
    mask = kept.repeat_interleave(8, dim=-1).repeat_interleave(8, dim=-2)
    torch.testing.assert_close(reused, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)
    operator(*qkv(32))  # another grid: searched again, never reusing the 64-token pattern
    assert operator.keep.shape[-1] == 4


@pytest.mark.parametrize("side", [1, 2, 4, 8])
def test_hilbert_permutation_inverts_and_steps_to_neighbours(side):
    perm = hilbert_permutation(side)
    assert sorted(perm.tolist()) == list(range(side * side))
    x = torch.randn(3, side * side)
    torch.testing.assert_close(x[:, perm][:, inverse_permutation(perm)], x)
    rows, cols = perm // side, perm % side
    assert ((rows.diff().abs() + cols.diff().abs()) == 1).all()  # consecutive tokens are grid neighbours


def test_hierarchical_window_over_the_grid_is_full_and_hilbert_windows_are_squares():
    q, k, v = qkv(64)
    torch.testing.assert_close(HierarchicalAttention(window=8)(q, k, v), full(q, k, v), atol=1e-5, rtol=1e-5)
    perm = hilbert_permutation(8)
    for start in range(0, 64, 16):
        rows, cols = perm[start:start + 16] // 8, perm[start:start + 16] % 8
        assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3
    windowed = HierarchicalAttention(window=4, pool=0)(q, k, v)  # no global pathway: window attention
    in_window = torch.zeros(64, 64, dtype=torch.bool)
    for start in range(0, 64, 16):
        members = perm[start:start + 16]
        in_window[members.view(-1, 1), members.view(1, -1)] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=in_window)
    torch.testing.assert_close(windowed, expected, atol=1e-5, rtol=1e-5)
    assert HierarchicalAttention(window=4, pool=2)(q, k, v).shape == q.shape


def test_operators_build_from_the_config_and_only_in_chosen_blocks():
    config = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10,
                       attention="local", attention_options={"radius": 2, "pool": 2, "blocks": [1, 3]})
    dit = config.build()
    names = [block.attn.operator_name for block in dit.blocks]
    assert names == ["full", "local", "full", "local"]
    reloaded = type(config).from_dict(config.to_dict()).build()
    reloaded.load_state_dict(dit.state_dict())
    assert "blocks.1.attn.operator.pool_weight" in dit.state_dict()


def test_sampling_resets_searched_patterns_so_a_seed_samples_the_same_images(perturb):
    from ditlab.diffusion.gaussian import GaussianDiffusion
    from ditlab.diffusion.sample import sample_images

    config = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                       attention="block-sparse", attention_options={"coverage": 0.3, "block_size": 4, "search_every": 3})
    dit = perturb(config.build()).eval()
    objective, labels = GaussianDiffusion(), torch.tensor([1, 2])

    def draw(seed: int) -> torch.Tensor:
        return sample_images(dit, objective, labels, steps=4, sampler="ddim", cfg_scale=2.0, seed=seed)

    first = draw(0)
    draw(1)  # leaves other patterns behind
    assert torch.equal(draw(0), first)
    stale = [block.attn.operator.keep for block in dit.blocks]
    dit.reset()
    assert all(keep is not None for keep in stale) and all(block.attn.operator.keep is None for block in dit.blocks)


BAD = [
    ("local", {"radius": 0.5}, r"radius=0.5 for 'local' must be at least 1"),
    ("local", {"radius": 2, "pool": 3}, r"4x4 token grid is not divisible by attention_options.pool=3"),
    ("local", {}, r"'local' attention needs attention_options.radius"),
    ("local", {"radius": 2, "size": 3}, r"unknown attention_options \['size'\] for the 'local' attention"),
    ("window", {"window": 0}, r"window=0 for 'window' must be an integer >= 1"),
    ("hyena", {"variant": "z"}, r"variant='z' for 'hyena'; choices"),
    ("block-sparse", {"block_size": 5}, r"16 tokens are not divisible by attention_options.block_size=5"),
    ("hierarchical", {"window": 3}, r"windows of 3x3 tokens do not tile a 4x4 grid"),
    ("local", {"radius": 2, "blocks": [7]}, r"attention_options.blocks has \[7\] outside 0..1"),
    ("sliding", {}, r"unknown attention kind 'sliding'; registered: \["),
]


@pytest.mark.parametrize(("kind", "options", "message"), BAD)
def test_bad_options_give_one_line(kind, options, message):
    with pytest.raises(ValueError, match=message) as error:
        DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                  attention=kind, attention_options=options).build()
    assert "\n" not in str(error.value)
