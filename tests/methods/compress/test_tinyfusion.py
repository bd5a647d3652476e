"""TinyFusion's learned layer mask: N:M patterns, straight-through sampling, masked blocks, the learning loop."""

from __future__ import annotations

import math

import pytest
import torch

from ditlab.data.digits import digits_tensors
from ditlab.diffusion import GaussianDiffusion
from ditlab.methods.compress.analysis import select_blocks
from ditlab.methods.compress.tinyfusion import LayerMask, masked_forward, nm_patterns
from ditlab.models.taps import run_blocks


def test_nm_patterns_list_every_way_to_keep_n_of_m():
    patterns = nm_patterns(4, 2)
    assert patterns.shape == (math.comb(4, 2), 4) and (patterns.sum(1) == 2).all()
    assert len({tuple(row.tolist()) for row in patterns}) == 6
    with pytest.raises(ValueError, match="1..4"):
        nm_patterns(4, 5)


def test_sampled_masks_keep_n_per_group_and_pass_gradients_to_the_logits():
    mask = LayerMask(depth=6, num_keep=3, group_size=2)
    generator = torch.Generator().manual_seed(0)
    sample = mask.sample(tau=1.0, generator=generator)
    assert sample.shape == (6,) and torch.equal(sample.detach().reshape(3, 2).sum(1), torch.ones(3))
    assert set(sample.detach().tolist()) <= {0.0, 1.0}
    (sample * torch.arange(6.0)).sum().backward()
    assert mask.logits.grad is not None and mask.logits.grad.abs().sum() > 0
    assert torch.allclose(mask.keep_probability(), torch.full((6,), 0.5))
    with pytest.raises(ValueError, match="multiple of 3"):
        LayerMask(depth=6, num_keep=2, group_size=2)


def test_masked_forward_is_the_network_with_the_zeroed_blocks_skipped(tiny_dit, dit_inputs):
    dit = tiny_dit(std=0.2).eval()
    x, t, y = dit_inputs(dit)
    with torch.no_grad():
        full = masked_forward(dit, torch.ones(dit.depth), x, t, y)
        assert torch.allclose(full, dit(x, t, y), atol=1e-6)
        mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
        assert torch.allclose(masked_forward(dit, mask, x, t, y), run_blocks(dit, x, t, y, skip=(1, 4)).output, atol=1e-6)


def test_learned_mask_is_deterministic_leaves_the_network_alone_and_moves_its_gates(tiny_dit):
    dit = tiny_dit(std=0.2)
    before = {key: value.clone() for key, value in dit.state_dict().items()}
    images, labels = digits_tensors(image_size=8)
    run = lambda: select_blocks(dit, GaussianDiffusion(), images[:32], labels[:32], "tinyfusion", 3,  # noqa: E731
                                steps=6, batch_size=8, seed=1)  # fmt: skip
    first, second = run(), run()
    assert first.keep == second.keep and len(first.keep) == 3
    assert all(len({b for b in first.keep if b // 2 == group}) == 1 for group in range(3))  # 1:2 per pair
    assert torch.equal(first.table["logits"], second.table["logits"]) and first.table["logits"].abs().sum() > 0
    assert len(first.table["losses"]) == 6
    assert all(torch.equal(before[key], value) for key, value in dit.state_dict().items())
