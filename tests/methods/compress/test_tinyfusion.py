"""TinyFusion's learned layer mask: N:M patterns, straight-through sampling, masked blocks, the learning loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ditlab.data.digits import digits_tensors
from ditlab.diffusion import GaussianDiffusion
from ditlab.methods.compress.analysis import select_blocks
from ditlab.methods.compress.tinyfusion import LayerMask, masked_forward, nm_patterns
from ditlab.models.dit import DiT
from ditlab.models.taps import run_blocks

REFERENCE = json.loads((Path(__file__).parent / "data" / "tinyfusion_reference.json").read_text())


def test_nm_patterns_list_every_way_to_keep_n_of_m():
    patterns = nm_patterns(4, 2)
    assert patterns.shape == (math.comb(4, 2), 4) and (patterns.sum(1) == 2).all()
    assert len({tuple(row.tolist()) for row in patterns}) == 6
    with pytest.raises(ValueError, match="1..4"):
        nm_patterns(4, 5)


def test_sampled_masks_keep_n_per_group_and_pass_gradients_to_the_logits():
    mask = LayerMask(depth=6, num_keep=3, group_size=2)
    generator = torch.Generator().manual_seed(0)
    sample = mask.sample(tau=1.0, generator=generator, batch=5)
    assert sample.shape == (5, 6) and torch.equal(sample.detach().reshape(5, 3, 2).sum(2), torch.ones(5, 3))
    assert set(sample.detach().flatten().tolist()) <= {0.0, 1.0}
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


def test_per_sample_masks_and_gate_gradients_match_the_reference():
    """The reference's forward on the same weights and Gumbel noise: a pattern per sample (before: one per batch,
    3 of 4 samples on another pattern, the gate gradient 99% off)."""
    network = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10,
                  class_dropout_prob=0.0)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in sorted(network.named_parameters()):
            if name != "pos_embed":
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    mask = LayerMask(depth=4, num_keep=2, group_size=2)
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([[0.3, -0.2], [-0.1, 0.4]]))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    w = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    t, y = torch.tensor([10.0, 300.0, 600.0, 950.0]), torch.tensor([3, 5, 0, 9])
    sampled = mask.sample(1.5, 2.0, torch.Generator().manual_seed(3), batch=4)
    assert sampled.tolist() == REFERENCE["masks"]
    loss = (masked_forward(network.train(), sampled, x, t, y) * w).sum()
    loss.backward()
    assert float(loss) == pytest.approx(REFERENCE["output_sum_w"], rel=1e-4)  # float32 rounding differs by CPU (2e-5 seen)
    torch.testing.assert_close(mask.logits.grad, torch.tensor(REFERENCE["gate_grad"]), rtol=1e-4, atol=1e-3)


def test_the_kept_blocks_come_from_the_ema_of_the_gate_logits(tiny_dit):
    """``prune_by_learning.py``: EMA 0.999 of the gates from their start (0 here), argmax of the EMA decides."""
    images, labels = digits_tensors(image_size=8)
    dit = tiny_dit(std=0.2)
    selection = select_blocks(dit, GaussianDiffusion(), images[:16], labels[:16], "tinyfusion", 3, steps=1,
                              batch_size=8, seed=1)  # fmt: skip
    logits, ema = selection.table["logits"], selection.table["ema_logits"]
    torch.testing.assert_close(ema, 0.001 * logits)
    assert selection.keep == LayerMask(6, 3, 2).keep(ema)
