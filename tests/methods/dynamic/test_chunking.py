"""Dynamic chunking (DC-DiT): identity with every token kept, ratio loss minimum, padded == per-sample, plug-back."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ditlab.methods.dynamic.chunking import chunk_indices, dechunk, nearest_kept, ratio_loss
from ditlab.methods.dynamic.export import dynamic_flops


def test_chunk_and_dechunk_with_every_token_kept_is_the_identity(tiny_dit, dit_inputs, make_dynamic):
    plain = tiny_dit()
    dynamic = make_dynamic(plain, "chunking", router_bias=30.0, smoothing=0.0)
    x, t, y = dit_inputs(plain, size=3)
    assert torch.equal(dynamic(x, t, y), plain(x, t, y))
    assert (dynamic.trunk.last.details["kept"] == 1).all() and torch.equal(dynamic.trunk.last.ratio, torch.ones(3))
    smoothed = make_dynamic(plain, "chunking", smoothing=1.0)
    smoothed.trunk.force_keep_all = True  # p == 1 everywhere: smoothing weighs the neighbours by 1 - p = 0
    assert torch.equal(smoothed(x, t, y), plain(x, t, y))


def test_the_ratio_loss_is_one_at_its_target_with_zero_slope_and_pushes_towards_it():
    target = 4.0
    for fraction, sign in ((0.25, 0), (0.75, 1), (0.0625, -1)):
        boundary = torch.zeros(16, 16, dtype=torch.bool)
        boundary[:, : int(fraction * 16)] = True
        p = torch.full((16, 16), 0.25, requires_grad=True)
        loss = ratio_loss(boundary, p, target)
        loss.backward()
        slope = p.grad.sum()
        if sign == 0:
            assert loss.item() == pytest.approx(1.0) and slope.item() == pytest.approx(0.0, abs=1e-6)
        else:
            assert torch.sign(slope).item() == sign  # F > 1/N: descent lowers p; F < 1/N: raises it
    with pytest.raises(ValueError, match="must exceed 1"):
        ratio_loss(boundary, p, 1.0)


def test_padded_and_masked_batch_equals_each_sequence_alone(tiny_dit, dit_inputs, make_dynamic, scramble):
    plain = tiny_dit()
    dynamic = make_dynamic(plain, "chunking", router_bias=0.0, smoothing=1.0)
    scramble(dynamic.trunk.router, seed=4, std=0.5)
    with torch.no_grad():
        dynamic.trunk.residual.weight.normal_(0, 0.05)
    x, t, y = dit_inputs(plain, size=5)
    batch = dynamic(x, t, y)
    kept = dynamic.trunk.last.details["kept"]
    assert len(kept.unique()) > 1 and (kept < 1).all()  # different lengths, so rows are padded
    alone = torch.cat([dynamic(x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)
    single = dynamic(x[:1], t[:1], y[:1])
    with FlopCounterMode(display=False) as counter:  # one sequence: nothing padded, all FLOPs are counted ones
        dynamic.trunk.smoothing = 0.0
        dynamic(x[:1], t[:1], y[:1])
    attention_mixing = sum(4 * int(k) ** 2 * b.attn.num_heads * b.attn.head_dim  # fused CPU kernel: not counted
                           for b in dynamic.blocks for k in [kept[0] * dynamic.x_embedder.num_patches])  # fmt: skip
    assert counter.get_total_flops() + attention_mixing == int(dynamic_flops(dynamic).sum())
    assert single.shape == (1, *batch.shape[1:])


def test_nearest_kept_plug_back_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    grid = 5
    boundary = torch.rand(4, grid * grid, generator=generator) > 0.6
    boundary[:, 0] = True
    index, valid = chunk_indices(boundary)
    source = nearest_kept(index, valid, grid)
    for row in range(4):
        kept = [int(i) for i in index[row][valid[row]]]
        assert kept == sorted(kept)  # raster order
        for position, (r, c) in enumerate(itertools.product(range(grid), range(grid))):
            distances = [((r - k // grid) ** 2 + (c - k % grid) ** 2, k) for k in kept]
            assert kept[int(source[row, position])] == min(distances)[1]


@pytest.mark.parametrize("sigma", ["1.0", "0.0"])
def test_dechunker_reproduces_the_reference_outputs_and_router_gradients(sigma):
    """Recorded from DC-DiT's ``ChunkLayer``/``DeChunkLayer`` and H-Net's STE residual (see the fixture's
    ``reference``): the same kept tokens, smoothing weights ``kernel x p_j`` with the token itself included, ``p``
    clamped, and each position's gradient reaching its own decision's probability."""
    recorded = json.loads((Path(__file__).parent / "data" / "dcdit_reference.json").read_text())
    tokens, weights = torch.tensor(recorded["tokens"]), torch.tensor(recorded["loss_weights"])
    p = torch.tensor(recorded["p"], requires_grad=True)
    boundary = p > 0.5
    index, valid = chunk_indices(boundary)
    chunk = tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1])) * 1.5 + 0.1
    out = dechunk(chunk, p, boundary, index, valid, recorded["grid"], float(sigma))
    (out * weights).sum().backward()
    case = recorded["cases"][sigma]
    torch.testing.assert_close(out, torch.tensor(case["out"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.grad, torch.tensor(case["grad_p"]), rtol=1e-4, atol=1e-5)
