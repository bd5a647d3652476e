"""The conformance suite every cache policy passes on a toy DiT on CPU: identity settings sample bit-for-bit
what the network samples, the branch evaluations run equal the plan, reset makes two runs equal, a batched CFG
pass equals separate conditional and unconditional passes, and Delta-DiT's exactness discriminator."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ditlab.diffusion.sample import sample_images
from ditlab.methods.sampling.caches import build_policy, model_call_times
from ditlab.models.taps import run_block_range

IDENTITY = [
    {"policy": "none"},
    {"policy": "fora", "options": {"interval": 1}},
    {"policy": "delta-dit", "options": {"interval": 1}},
    {"policy": "delta-dit", "options": {"blocks": 0, "interval": 3}},
    {"policy": "teacache", "options": {"threshold": 0.0}},
    {"policy": "taylorseer", "options": {"interval": 1, "order": 2}},
    {"policy": "magcache", "options": {"threshold": 0.0}},
    {"policy": "toca", "options": {"interval": 1}},
]
APPROXIMATE = [
    {"policy": "fora", "options": {"interval": 3}},
    {"policy": "delta-dit", "options": {"interval": 3, "blocks": 2, "boundary": 0.5}},
    {"policy": "teacache", "options": {"threshold": 0.3}},
    {"policy": "taylorseer", "options": {"interval": 3, "order": 2, "warmup": 2}},
    {"policy": "magcache", "options": {"threshold": 0.5, "max_skip": 2, "warmup": 1}},
    {"policy": "toca", "options": {"interval": 3, "ratio": 0.25}},
]
LABELS = torch.tensor([3, 1, 4])


def name(cache: dict) -> str:
    return "-".join(str(v) for v in cache.values())


class Zero(torch.nn.Module):
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(inputs)


def test_block_hands_each_branch_to_the_hook_and_uses_what_it_returns(dit):
    tokens, cond = dit.embed(torch.randn(3, 1, 8, 8), torch.tensor([10.0, 500.0, 900.0]), torch.tensor([1, 2, 3]))
    block, seen = dit.blocks[1], []

    def record(branch):
        seen.append((branch.block, branch.kind))
        return branch.compute()

    assert torch.equal(block(tokens, cond, branches=record, index=1), block(tokens, cond))
    assert seen == [(1, "attention"), (1, "mlp")]
    without_mlp = copy.deepcopy(block)
    without_mlp.mlp = Zero()
    dropped = block(tokens, cond, branches=lambda b: torch.zeros_like(b.inputs()) if b.kind == "mlp" else b.compute())
    assert torch.equal(dropped, without_mlp(tokens, cond))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([0, 9])
    tokens, cond = dit.embed(x, t, y)
    assert torch.equal(dit.head(run_block_range(dit, tokens, cond, branches=record), cond), dit(x, t, y))


@pytest.mark.parametrize("setting", ["ddim", "ddpm", "euler"])
@pytest.mark.parametrize("cache", IDENTITY, ids=name)
def test_identity_setting_samples_exactly_what_the_network_samples(dit, make_policy, settings, cache, setting):
    objective, sampler = settings[setting]
    policy = make_policy(dit, cache, setting, steps=6)
    cached = sample_images(policy, objective, LABELS, steps=6, sampler=sampler, cfg_scale=2.0, seed=5)
    plain = sample_images(dit, objective, LABELS, steps=6, sampler=sampler, cfg_scale=2.0, seed=5)
    assert torch.equal(cached, plain)
    assert policy.computed_share == 1.0


class BranchCounter:
    """Counts the (row, token) evaluations of every attention and MLP module with read-only forward hooks."""

    def __init__(self, dit) -> None:
        self.counts = {"attention": 0, "mlp": 0}
        self.handles = [block.attn.register_forward_hook(self.hook("attention")) for block in dit.blocks]
        self.handles += [block.mlp.register_forward_hook(self.hook("mlp")) for block in dit.blocks]

    def hook(self, kind: str):
        def count(module, inputs, output) -> None:
            self.counts[kind] += inputs[0].shape[0] * inputs[0].shape[1]

        return count

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def plan(cache: dict, calls: int, depth: int, rows: int, tokens: int) -> dict[str, int]:
    """The (row, token) evaluations of each branch kind, from the knobs alone (the specs' analytic counts)."""
    policy, options = cache["policy"], cache["options"]
    if policy in ("fora", "taylorseer", "toca"):
        warmup, interval = options.get("warmup", 0), options["interval"]
        if policy == "fora":  # FORA: the first call, the warm-up and every interval-th call counted from the last
            full = sum(1 for k in range(calls) if k < max(1, warmup) or (calls - 1 - k) % interval == 0)
        elif policy == "taylorseer":  # TaylorSeer: the interval counted from the last warm-up call
            full = sum(1 for k in range(calls) if k < max(1, warmup) or (k - max(1, warmup) + 1) % interval == 0)
        else:
            full = sum(1 for k in range(calls) if k < warmup or (k - warmup) % interval == 0)
        attention = full * depth * rows * tokens
        mlp = attention + (calls - full) * depth * rows * round(options.get("ratio", 0) * tokens)
        return {"attention": attention, "mlp": mlp}
    if policy == "delta-dit":
        boundary = round(options["boundary"] * calls)
        full = math.ceil(boundary / options["interval"]) + math.ceil((calls - boundary) / options["interval"])
        blocks = calls * depth - (calls - full) * options["blocks"]
        return {"attention": blocks * rows * tokens, "mlp": blocks * rows * tokens}
    if policy == "teacache":  # an infinite threshold: only the forced first and last calls compute
        return {"attention": 2 * depth * rows * tokens, "mlp": 2 * depth * rows * tokens}
    if policy == "magcache":  # an infinite threshold: warm-up, then every (max_skip + 1)-th call computes
        full = options["warmup"] + (calls - options["warmup"]) // (options["max_skip"] + 1)
        return {"attention": full * depth * rows * tokens, "mlp": full * depth * rows * tokens}
    raise AssertionError(policy)


PLANNED = [
    {"policy": "fora", "options": {"interval": 3}},
    {"policy": "fora", "options": {"interval": 4, "warmup": 3}},
    {"policy": "taylorseer", "options": {"interval": 3, "order": 2, "warmup": 2}},
    {"policy": "toca", "options": {"interval": 2, "ratio": 0.25}},
    {"policy": "delta-dit", "options": {"interval": 2, "blocks": 3, "boundary": 0.4}},
    {"policy": "delta-dit", "options": {"interval": 3, "blocks": 1, "boundary": 0.7}},
    {"policy": "teacache", "options": {"threshold": 1e30, "coefficients": [1.0, 0.0]}},
    {"policy": "magcache", "options": {"threshold": 1e30, "max_skip": 2, "warmup": 2, "magnitudes": [1.0] * 11}},
]


@pytest.mark.parametrize("cache", PLANNED, ids=name)
def test_branch_evaluations_equal_the_plan(dit, make_policy, settings, cache):
    objective, sampler = settings["ddim"]
    policy = make_policy(dit, cache, steps=11)
    counter = BranchCounter(dit)
    try:
        sample_images(policy, objective, LABELS, steps=11, sampler=sampler, cfg_scale=2.0, batch_size=3)
    finally:
        counter.close()
    expected = plan(cache, 11, dit.depth, rows=2 * len(LABELS), tokens=16)
    assert counter.counts == expected
    computed = (expected["attention"] + expected["mlp"]) / (2 * 11 * dit.depth * 2 * len(LABELS) * 16)
    assert policy.computed_share == pytest.approx(computed)


@pytest.mark.parametrize("cache", APPROXIMATE, ids=name)
def test_same_seed_twice_is_equal_and_reset_clears_the_cache(dit, make_policy, settings, cache):
    objective, sampler = settings["ddim"]
    policy = make_policy(dit, cache)
    plain = sample_images(dit, objective, LABELS, steps=8, sampler=sampler, cfg_scale=2.0, seed=1)
    first = sample_images(policy, objective, LABELS, steps=8, sampler=sampler, cfg_scale=2.0, seed=1)
    sample_images(policy, objective, torch.tensor([7, 7, 7]), steps=8, sampler=sampler, cfg_scale=2.0, seed=9)
    again = sample_images(policy, objective, LABELS, steps=8, sampler=sampler, cfg_scale=2.0, seed=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, plain) and policy.computed_share < 1  # it did cache something
    assert (first - plain).abs().max() < plain.abs().max()  # an approximation of the network, not noise


def split_cfg_ddim(make, objective, labels, steps: int, scale: float, seed: int) -> torch.Tensor:
    """DDIM with guidance from two separate model functions (conditional rows, unconditional rows)."""
    from ditlab.diffusion.sample import seeded_noise

    cond, uncond = make(), make()
    cond.reset(), uncond.reset()
    scheduler = objective.scheduler("ddim")
    scheduler.set_timesteps(steps)
    sample = seeded_noise((len(labels), 1, 8, 8), seed)
    null = torch.full_like(labels, 10)
    for timestep in scheduler.timesteps:
        t = objective.model_time(objective.scheduler_time(timestep, scheduler)).expand(len(labels))
        with torch.no_grad():
            c, u = cond(sample, t, labels)[:, :1], uncond(sample, t, null)[:, :1]
        sample = scheduler.step(u + scale * (c - u), timestep, sample).prev_sample
    return sample


@pytest.mark.parametrize("cache", APPROXIMATE, ids=name)
def test_batched_cfg_equals_separate_conditional_and_unconditional_calls(dit, make_policy, settings, cache):
    objective, sampler = settings["ddim"]
    batched = sample_images(make_policy(dit, cache), objective, LABELS, steps=8, sampler=sampler, cfg_scale=2.0,
                            seed=3)  # fmt: skip
    separate = split_cfg_ddim(lambda: make_policy(dit, cache), objective, LABELS, 8, 2.0, seed=3)
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=1e-5)


def test_rows_are_independent_of_the_batch_they_ride_in(dit, make_policy, settings):
    """TeaCache decides per row, so a sample's trajectory does not depend on its batch mates."""
    objective, sampler = settings["ddim"]
    cache = {"policy": "teacache", "options": {"threshold": 0.3}}
    together = sample_images(make_policy(dit, cache), objective, LABELS, steps=8, sampler=sampler, seed=3)
    alone = torch.cat([sample_images(make_policy(dit, cache), objective, LABELS[i : i + 1], steps=8,
                                     sampler=sampler, seed=3, start=i) for i in range(len(LABELS))])  # fmt: skip
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def constant_branch_dit(make_toy_dit):
    """Blocks whose attention and MLP outputs ignore the tokens (zero input weights) and a condition that ignores
    the time: every block adds the same increment at every call, whatever its input."""
    dit = make_toy_dit(learn_sigma=False)
    with torch.no_grad():
        dit.t_embedder.mlp[2].weight.zero_()
        for block in dit.blocks:
            block.attn.qkv.weight.zero_()
            block.attn.qkv.bias.zero_()
            block.attn.proj.bias.normal_(std=0.5)
            block.mlp.fc1.weight.zero_()
            block.mlp.fc1.bias.normal_(std=0.5)
    return dit


def test_delta_cache_is_exact_where_naive_output_caching_is_not(make_toy_dit, settings):
    dit = constant_branch_dit(make_toy_dit)
    objective, sampler = settings["ddim"]
    cache = {"policy": "delta-dit", "options": {"interval": 4, "blocks": 2, "boundary": 0.5}}
    policy = build_policy(dit, cache, objective, sampler, 8)
    delta = sample_images(policy, objective, LABELS, steps=8, sampler=sampler, seed=2)
    plain = sample_images(dit, objective, LABELS, steps=8, sampler=sampler, seed=2)
    assert policy.computed_share < 0.8
    torch.testing.assert_close(delta, plain, atol=1e-5, rtol=1e-5)

    class NaiveOutputCache(type(policy)):
        """The ablation: store the range's output and reuse it, ignoring the range's current input."""

        def compute(self, x, t, y, call):
            tokens, cond = self.dit.embed(x, t, y)
            span = self.cached_range(self.stage(call))
            full = self.full_call(call)
            tokens = run_block_range(self.dit, tokens, cond, range(0, span.start))
            if full:
                tokens = run_block_range(self.dit, tokens, cond, span)
                self.delta, self.delta_stage, self.last_full = tokens, self.stage(call), call
            else:
                tokens = self.delta
            tokens = run_block_range(self.dit, tokens, cond, range(span.stop, self.depth))
            return self.dit.head(tokens, cond)

    naive = NaiveOutputCache(dit, model_call_times(objective, sampler, 8), interval=4, blocks=2, boundary=0.5,
                             warmup=0)  # fmt: skip
    naive_samples = sample_images(naive, objective, LABELS, steps=8, sampler=sampler, seed=2)
    assert (naive_samples - plain).abs().max() > 1e-2


def test_delta_dit_computes_the_first_call_of_each_stage(dit, make_policy):
    cache = {"policy": "delta-dit", "options": {"interval": 5, "blocks": 2, "boundary": 0.5}}
    policy = make_policy(dit, cache, steps=8)
    fulls = []
    policy.reset()
    for call in range(policy.num_calls):
        fulls.append(policy.full_call(call))
        policy.compute(torch.randn(2, 1, 8, 8), torch.full((2,), policy.times[call]), torch.tensor([1, 2]), call)
    assert fulls == [True, False, False, False, True, False, False, False]  # the switch at call 4 is full


def test_order_zero_forecast_and_zero_token_ratio_are_fora(dit, make_policy, settings):
    """On one plan (FORA's from the start, TaylorSeer's counted after warm-up, ToCa's)."""
    objective, sampler = settings["ddim"]
    fora = make_policy(dit, {"policy": "fora", "options": {"interval": 3, "warmup": 2, "align": "start"}})
    fora = sample_images(fora, objective, LABELS, steps=8, sampler=sampler, seed=4)
    for cache in ({"policy": "taylorseer", "options": {"interval": 3, "order": 0, "warmup": 2,
                                                       "count_from": "after_warmup"}},
                  {"policy": "toca", "options": {"interval": 3, "ratio": 0.0, "warmup": 2}}):  # fmt: skip
        other = sample_images(make_policy(dit, cache), objective, LABELS, steps=8, sampler=sampler, seed=4)
        assert torch.equal(other, fora), cache


def test_guidance_limited_to_an_interval_switches_the_batch_layout_and_caches_follow(dit, make_policy, settings):
    """Outside the interval the sampler calls with the conditional rows only: identity settings stay exact, and
    the approximate ones drop their cache at the switch instead of mixing row layouts."""
    objective, sampler = settings["ddim"]
    options = {"steps": 8, "sampler": sampler, "cfg_scale": 2.0, "seed": 6, "guidance_interval": (0.0, 0.5)}
    plain = sample_images(dit, objective, LABELS, **options)
    for cache in IDENTITY[:3]:
        assert torch.equal(sample_images(make_policy(dit, cache), objective, LABELS, **options), plain), cache
    for cache in APPROXIMATE:
        policy = make_policy(dit, cache)
        cached = sample_images(policy, objective, LABELS, **options)
        assert (cached - plain).abs().max() < plain.abs().max(), cache
        assert policy.rows == 2 * len(LABELS)  # the trajectory ended guided


def test_adaptive_solvers_cannot_be_served(dit):
    from ditlab.diffusion import FlowMatching

    with pytest.raises(ValueError, match="dopri5 is an adaptive solver"):
        build_policy(dit, {"policy": "fora"}, FlowMatching(), "dopri5", None)
