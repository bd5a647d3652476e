"""PixArt-Sigma's key/value compression: ratio 1 is full attention, the average initialisation, the cost it
counts (falling with the ratio, its slope against tokens), refusals, and grafting it into a trained DiT."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ditlab.models  # noqa: F401 - registers the operators
from ditlab.methods.graft import graft_operator, select_blocks
from ditlab.methods.graft.stage1 import Stage1Config, cache_operator_io, regress_operators
from ditlab.models.attention import Attention
from ditlab.models.budget import flops_per_image
from ditlab.models.config import DiTConfig
from ditlab.models.operators.cost import attention_operator_flops
from ditlab.models.operators.kv_compress import KVCompressAttention


def qkv(num_tokens: int = 64, batch: int = 2, heads: int = 2, head_dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, num_tokens, head_dim, generator=generator) for _ in range(3)]


def test_ratio_one_is_full_attention_with_no_parameters():
    q, k, v = qkv()
    operator = KVCompressAttention(channels=16, ratio=1)
    assert not list(operator.parameters())
    torch.testing.assert_close(operator(q, k, v), F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(operator.map(q, k) @ v, F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-5)


def test_a_kv_compress_network_at_ratio_one_is_the_full_network(tiny_dit, dit_inputs):
    full = tiny_dit()
    compressed = full.config.replace(attention="kv-compress", attention_options={"ratio": 1}).build().eval()
    compressed.load_state_dict(full.state_dict())  # strict: ratio 1 adds no weights
    x, t, y = dit_inputs(full)
    with torch.no_grad():
        torch.testing.assert_close(compressed(x, t, y), full(x, t, y), atol=1e-6, rtol=1e-5)
    assert flops_per_image(compressed) == flops_per_image(full)


@pytest.mark.parametrize("ratio", [2, 4])
def test_the_grouped_convolution_starts_as_average_pooling_of_keys_and_values(ratio):
    q, k, v = qkv(64)  # 8x8 grid
    operator = KVCompressAttention(channels=16, ratio=ratio)
    assert operator.sr.groups == 16 and operator.sr.stride == (ratio, ratio)

    def pooled(tensor):  # (B, H, N, Dh) -> average-pooled on the grid, same layout
        batch, heads, _, head_dim = tensor.shape
        grid = tensor.permute(0, 1, 3, 2).reshape(batch, heads * head_dim, 8, 8)
        return F.avg_pool2d(grid, ratio).flatten(2).transpose(1, 2).reshape(batch, -1, heads, head_dim).transpose(1, 2)

    reference = F.scaled_dot_product_attention(q, pooled(k), pooled(v))
    torch.testing.assert_close(operator(q, k, v), reference, atol=1e-6, rtol=1e-5)
    assert (operator(q, k, v) - F.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-2
    norm = KVCompressAttention(channels=16, ratio=ratio, norm=True)  # the public code's LayerNorm(C) after the conv
    assert norm.compress(k).shape == (2, 2, 64 // ratio**2, 8)
    assert not torch.allclose(norm(q, k, v), reference, atol=1e-3)


def test_macs_fall_with_the_ratio_and_are_what_the_operator_computes():
    heads, head_dim, tokens = 4, 16, 256
    macs = [KVCompressAttention(heads * head_dim, ratio).macs(tokens, heads, head_dim) for ratio in (1, 2, 4, 8)]
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == 4
    channels = heads * head_dim
    for ratio, counted in zip((2, 4, 8), macs[1:]):
        assert counted == 2 * tokens * (tokens // ratio**2) * channels + 2 * tokens * channels
    assert macs[0] == 2 * tokens * tokens * channels  # the full operator's count


def test_cost_slope_against_tokens_is_quadratic_divided_by_the_squared_ratio():
    heads, head_dim = 4, 16
    sides = [8, 16, 32, 64]
    for ratio in (1, 2, 4):
        operator = KVCompressAttention(heads * head_dim, ratio)
        cost = [operator.macs(side * side, heads, head_dim) for side in sides]
        slopes = [math.log(b / a) / math.log(4) for a, b in zip(cost, cost[1:])]  # tokens grow 4x per step
        assert all(1.8 < slope <= 2.0 + 1e-9 for slope in slopes), (ratio, slopes)  # O(N^2 / r^2) + O(N)
        full = [KVCompressAttention(heads * head_dim, 1).macs(side * side, heads, head_dim) for side in sides]
        assert cost[-1] / full[-1] == pytest.approx(1 / ratio**2, rel=0.01 * ratio**2)
    # in a network: the operator's FLOPs fall with the ratio, the projections do not change
    config = DiTConfig(input_size=32, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    networks = [config.replace(attention="kv-compress", attention_options={"ratio": r}).build() for r in (1, 2, 4)]
    operator_flops = [attention_operator_flops(network, config.num_tokens) for network in networks]
    totals = [flops_per_image(network) for network in networks]
    assert operator_flops[0] > operator_flops[1] > operator_flops[2]
    assert [a - b for a, b in zip(totals, totals[1:])] == [a - b for a, b in zip(operator_flops, operator_flops[1:])]


def test_bad_options_are_refused_in_one_line():
    config = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    for options, message in [({"ratio": 3}, "not divisible"), ({"ratio": 0}, "positive integer"),
                             ({"ratio": 2, "pool": 2}, "unknown attention_options"), ({"ratio": 2, "norm": 1}, "true or false")]:  # fmt: skip
        with pytest.raises(ValueError, match=message) as error:
            config.replace(attention="kv-compress", attention_options=options).build()
        assert "\n" not in str(error.value)
    q, k, _ = qkv(16)
    with pytest.raises(ValueError, match="no \\(N, N\\) attention map"):
        KVCompressAttention(16, 2).map(q, k)


def test_grafting_names_kv_compress_like_any_operator_and_stage1_trains_its_convolution(tiny_dit, dit_inputs):
    teacher = tiny_dit(depth=4).requires_grad_(False)
    blocks = select_blocks("odd", teacher.depth)  # Grafting's 50%: 0-based 0, 2
    student = graft_operator(teacher, "kv-compress", {"ratio": 2}, blocks)
    assert student.config.attention_options == {"ratio": 2, "blocks": [0, 2]}
    kinds = [type(block.attn.operator).__name__ for block in student.blocks]
    assert kinds == ["KVCompressAttention", "FullAttention", "KVCompressAttention", "FullAttention"]
    assert all(isinstance(block.attn, Attention) for block in student.blocks)
    # every shared weight is the teacher's; the compression starts as the average operator
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[name], tensor), name
    assert torch.all(student.blocks[0].attn.operator.sr.weight == 0.25)
    assert flops_per_image(student) < flops_per_image(teacher)
    # stage 1 regresses the compressed attention onto the teacher's attention output, block by block
    x, t, y = dit_inputs(teacher, size=16)
    report = regress_operators(student, cache_operator_io(teacher, x, t, y, blocks),
                               Stage1Config(steps=30, lr=5e-4, batch_size=16, loss="l2"))  # fmt: skip
    assert sorted(report) == blocks
    assert all(entry["mse_after"] < entry["mse_before"] for entry in report.values()), report
    assert not torch.all(student.blocks[0].attn.operator.sr.weight == 0.25)


def test_compressed_keys_keep_a_unit_last_stride_for_the_fused_kernel():
    """SDPA's fused CPU kernel needs the head dimension contiguous; a strided one falls back to the math path, which
    materialises the whole (N, N / r^2) map (1.2 GiB and 4.4x the time at 16,384 tokens, before this held)."""
    q, k, v = qkv(64)
    operator = KVCompressAttention(k.shape[1] * k.shape[-1], 2)
    compressed = operator.compress(k)
    assert compressed.shape[-2] == 64 // 4 and compressed.stride(-1) == 1
    expected = torch.nn.functional.scaled_dot_product_attention(q, compressed.contiguous(), operator.compress(v).contiguous())
    assert torch.allclose(operator(q, k, v), expected, atol=1e-6)
