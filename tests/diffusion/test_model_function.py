"""The sampler seam: any ``(x, t, y) -> output`` model function, guidance applied by the sampler, and a reset
at the start of every trajectory, so a caching-style policy plugs in over ``run_blocks``."""

from __future__ import annotations

import torch

from ditlab.diffusion import FlowMatching, GaussianDiffusion
from ditlab.diffusion.sample import sample_images
from ditlab.models.dit import DiT
from ditlab.models.taps import run_blocks


def tiny_dit() -> DiT:
    torch.manual_seed(0)
    dit = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10)
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: make the blocks matter
        for block in dit.blocks:
            block.adaLN_modulation[-1].weight.normal_(std=0.2)
        dit.final_layer.linear.weight.normal_(std=0.2)
    return dit.eval()


class ReuseDeepBlocks:
    """A toy feature cache: on every ``period``-th step it runs all blocks and stores the increment of the deep
    blocks ``deep``; on the other steps it skips them and adds the stored increment (Delta-DiT style)."""

    def __init__(self, dit: DiT, deep: list[int], period: int = 2) -> None:
        self.dit, self.deep, self.period = dit, deep, period
        self.config = dit.config  # what the sampler may ask (shape, null class)
        self.resets, self.calls_per_trajectory, self.skipped = 0, [], 0

    def reset(self) -> None:
        self.resets += 1
        self.calls_per_trajectory.append(0)
        self.step, self.increment = 0, None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls_per_trajectory[-1] += 1
        first, last = self.deep[0], self.deep[-1]
        if self.step % self.period == 0 or self.increment is None:
            tapped = run_blocks(self.dit, x, t, y, hidden=[first - 1, last])
            self.increment = tapped.hidden[last] - tapped.hidden[first - 1]
            output = tapped.output
        else:
            reuse = {first: lambda tokens, cond: tokens + self.increment}
            output = run_blocks(self.dit, x, t, y, replace=reuse, skip=self.deep[1:]).output
            self.skipped += len(self.deep)
        self.step += 1
        return output


def test_reset_once_per_trajectory_and_blocks_skipped_through_run_blocks():
    dit, labels = tiny_dit(), torch.tensor([0, 1, 2, 3, 4])
    cache = ReuseDeepBlocks(dit, deep=[2, 3])
    cached = sample_images(cache, GaussianDiffusion(), labels, batch_size=2, steps=6, sampler="ddim", cfg_scale=2.0)
    assert cache.resets == 3  # batches of 2, 2 and 1: three trajectories
    assert cache.calls_per_trajectory == [6, 6, 6]  # one call per step: both CFG branches ride in one batch
    assert cache.skipped == 3 * 3 * 2  # steps 1, 3, 5 of each trajectory skip blocks 2 and 3
    plain = sample_images(dit, GaussianDiffusion(), labels, batch_size=2, steps=6, sampler="ddim", cfg_scale=2.0)
    assert cached.shape == plain.shape and not torch.equal(cached, plain)
    assert (cached - plain).abs().max() < 0.5 * plain.abs().max()  # an approximation, not another model


def test_a_policy_that_never_reuses_samples_exactly_what_the_network_samples():
    dit, labels = tiny_dit(), torch.tensor([5, 6, 7])
    for objective, sampler in ((GaussianDiffusion(), "ddpm"), (FlowMatching(t_scale=1000.0), "euler")):
        exact = ReuseDeepBlocks(dit, deep=[2, 3], period=1)
        ours = sample_images(exact, objective, labels, steps=4, sampler=sampler, cfg_scale=1.5, seed=11)
        theirs = sample_images(dit, objective, labels, steps=4, sampler=sampler, cfg_scale=1.5, seed=11)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        assert exact.skipped == 0


def test_a_plain_function_needs_only_its_shape_and_null_class():
    dit, labels = tiny_dit(), torch.tensor([1, 2])
    calls = []

    def model(x, t, y):  # no attributes at all
        calls.append(t[0].item())
        return dit(x, t, y)

    ours = sample_images(model, GaussianDiffusion(), labels, steps=3, sampler="ddim", cfg_scale=3.0,
                         shape=(1, 8, 8), null_label=10)  # fmt: skip
    theirs = sample_images(dit, GaussianDiffusion(), labels, steps=3, sampler="ddim", cfg_scale=3.0)
    assert torch.equal(ours, theirs)
    assert calls == sorted(calls, reverse=True) and len(calls) == 3  # noise to data, the objective's time
