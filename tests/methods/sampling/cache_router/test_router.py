"""Learned caching: the plan policy, the routed training step, the image-error proxy and the router module."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from ditlab.diffusion import GaussianDiffusion
from ditlab.diffusion.sample import model_call_times, sample_images
from ditlab.diffusion.trajectory import Trajectory
from ditlab.methods.sampling.cache_router import (
    CacheRouterModule,
    RouterConfig,
    image_error_proxy,
    image_error_proxy_reference,
    routed_call,
)
from ditlab.methods.sampling.caches import build_policy
from ditlab.methods.sampling.caches.plan import Plan, StaticPlan
from ditlab.methods.teacher import TeacherConfig

OBJECTIVE = GaussianDiffusion(learn_sigma=True)


def plan_for(dit, table: torch.Tensor, steps: int = 4, sampler: str = "ddim") -> StaticPlan:
    times = model_call_times(OBJECTIVE, sampler, steps).tolist()
    return StaticPlan(table.tolist(), times, sampler, steps, dit.depth, 0.1)


def sample(model, labels, steps: int = 4) -> torch.Tensor:
    return sample_images(model, OBJECTIVE, labels, seed=3, sampler="ddim", steps=steps, cfg_scale=2.0, batch_size=8,
                         shape=(1, 8, 8), null_label=10)  # fmt: skip


def test_all_compute_plan_samples_bitwise_what_the_network_samples(tiny_dit):
    dit = tiny_dit(depth=4)
    labels = torch.arange(6)
    plan = plan_for(dit, torch.ones(4, 8, dtype=torch.bool))
    policy = Plan(dit, model_call_times(OBJECTIVE, "ddim", 4), plan=plan)
    assert torch.equal(sample(policy, labels), sample(dit, labels))
    assert policy.computed_share == 1.0


def test_plan_reuses_exactly_the_units_it_does_not_compute(tiny_dit, dit_inputs):
    """Call 1 skips block 2's MLP: its output is call 0's pre-gate MLP output under call 1's gate."""
    dit = tiny_dit(depth=4)
    table = torch.ones(2, 8, dtype=torch.bool)
    table[1, 5] = False
    schedule = torch.tensor([900.0, 500.0])
    policy = Plan(dit, schedule, plan=StaticPlan(table.tolist(), schedule.tolist(), "ddim", 2, 4))
    x, _, y = dit_inputs(dit)
    t0, t1 = torch.full((3,), 900.0), torch.full((3,), 500.0)
    kept = {}

    def record(branch):
        output = branch.compute()
        kept[branch.block, branch.kind] = output
        return output

    from ditlab.models.taps import run_block_range

    tokens, cond = dit.embed(x, t0, y)
    run_block_range(dit, tokens, cond, branches=record)
    tokens, cond = dit.embed(x * 0.9, t1, y)
    expected = dit.head(run_block_range(dit, tokens, cond, branches=lambda b: kept[2, "mlp"] if (b.block, b.kind) == (
        2, "mlp") else b.compute()), cond)  # fmt: skip
    policy(x, t0, y)
    assert torch.equal(policy(x * 0.9, t1, y), expected)
    assert policy.work["computed"] == 3 * (8 + 7)


def test_a_plan_for_another_sampler_or_step_count_is_refused_naming_both(tiny_dit, tmp_path):
    dit = tiny_dit(depth=4)
    path = plan_for(dit, torch.ones(4, 8, dtype=torch.bool)).save(tmp_path / "plan.json")
    cache = {"policy": "plan", "path": str(path)}
    assert build_policy(dit, cache, OBJECTIVE, "ddim", 4).num_calls == 4
    with pytest.raises(ValueError, match=r"plan.json was trained for ddim at 4 steps, not ddpm at 4 steps"):
        build_policy(dit, cache, OBJECTIVE, "ddpm", 4)
    with pytest.raises(ValueError, match=r"trained for ddim at 4 steps \(4 model calls\).*makes 8 model calls"):
        build_policy(dit, cache, OBJECTIVE, "ddim", 8)
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        build_policy(dit, {"policy": "plan", "path": str(tmp_path / "nope.json")}, OBJECTIVE, "ddim", 4)


def test_routed_call_with_scores_one_is_the_network_and_zero_reuses(tiny_dit, dit_inputs):
    dit = tiny_dit(depth=4)
    x, t, y = dit_inputs(dit)
    cache = {}
    first = routed_call(dit, x, t, y, torch.full((8,), 0.5), cache, 0.1)  # no cache yet: everything computed
    assert torch.equal(first, dit(x, t, y))
    stale = dict(cache)
    t2 = t * 0.5
    assert torch.equal(routed_call(dit, x, t2, y, torch.ones(8), dict(stale), 0.1), dit(x, t2, y))
    reuse = routed_call(dit, x, t2, y, torch.zeros(8), cache, 0.1)
    assert not torch.equal(reuse, dit(x, t2, y))
    assert all(torch.equal(cache[key], stale[key]) for key in stale)  # score 0 <= threshold: nothing refreshed


def make_module(teacher_file, mode: str = "harmonica", steps: int = 4, **router) -> CacheRouterModule:
    from ditlab.diffusion.config import SamplingConfig

    module = CacheRouterModule(teacher=TeacherConfig(checkpoint=str(teacher_file)),
                               router=RouterConfig(mode=mode, **router),
                               sampling=SamplingConfig(sampler="ddim", steps=steps, cfg_scale=2.0))  # fmt: skip
    module.configure_model()
    return module


def test_only_the_router_gets_gradients_and_the_first_row_none(teacher_file):
    module = make_module(teacher_file, sparsity=1e-3)
    before = copy.deepcopy(module.teacher.state_dict())
    for _ in range(3):
        terms, index = module.rollout_terms(4)
        module.router.theta.grad = None
        terms["loss"].backward()
        grad = module.router.theta.grad
        assert grad[index].abs().sum() > 0 and grad[0].abs().sum() == 0
        assert torch.count_nonzero(grad.abs().sum(1)) == 1  # only the trained call's row
        assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    after = module.teacher.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert list(module.state_dict()) == ["router.theta"]


@pytest.mark.parametrize("mode", ["harmonica", "l2c"])
def test_frozen_rows_never_move_under_real_updates(teacher_file, mode):
    """Weight decay and momentum included: the first call (and L2C's full calls) stay at +clamp, score exactly 1."""
    module = make_module(teacher_file, mode=mode, sparsity=1e-2)
    router = module.router
    optimizer = torch.optim.AdamW([router.theta], lr=0.5, weight_decay=0.1)
    start = router.theta.detach().clone()
    for _ in range(4):
        terms, _ = module.rollout_terms(4) if mode == "harmonica" else module.pair_terms(torch.randn(4, 1, 8, 8),
                                                                                        torch.arange(4))  # fmt: skip
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        router.clamp_()
    frozen = router.frozen
    assert frozen.tolist() == ([True, False, False, False] if mode == "harmonica" else [True, False, True, False])
    assert (router.theta[frozen] == 5.0).all() and (router.scores()[frozen] == 1.0).all()
    assert not torch.equal(router.theta[~frozen], start[~frozen])


def test_harmonica_moves_the_trajectory_with_the_students_prediction(teacher_file):
    module = make_module(teacher_file, init="constant", init_value=-1.0)
    module.rollout_terms(4)  # opens a trajectory (call 0 in full) and trains call 1
    rollout = module.rollout
    x, index, cache = rollout.x.clone(), rollout.index, {k: v.clone() for k, v in module.rollout_cache.items()}
    inputs = rollout.inputs()
    with torch.no_grad():
        student = routed_call(module.teacher, *inputs, module.router.scores()[index], dict(cache), 0.1)
        teacher = module.teacher(*inputs)

    def moved(output):
        trajectory = module.new_trajectory(x, rollout.labels)
        trajectory.index = index
        return trajectory.step(output)

    module.rollout_terms(4)
    assert rollout.index == index + 1
    assert torch.equal(rollout.x, moved(student))
    assert not torch.allclose(rollout.x, moved(teacher))


def test_l2c_pairs_train_only_cached_calls(teacher_file):
    module = make_module(teacher_file, mode="l2c", steps=6)
    images, labels = torch.randn(4, 1, 8, 8), torch.arange(4)
    seen = set()
    for _ in range(6):
        terms, index = module.pair_terms(images, labels)
        seen.add(index)
        module.router.theta.grad = None
        terms["loss"].backward()
        assert module.router.theta.grad[::2].abs().sum() == 0
    assert seen <= {1, 3, 5} and len(seen) > 1
    assert module.router.frozen.tolist() == [True, False] * 3


def test_batched_image_error_proxy_equals_one_trajectory_per_prefix(tiny_dit):
    dit = tiny_dit(depth=4, learn_sigma=True).double()
    run = partial(Trajectory, OBJECTIVE, sampler="ddim", steps=4, cfg_scale=2.0, null_label=10)
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 8, generator=generator, dtype=torch.float64)
    scores[0] = 1.0
    noise, labels = torch.randn(3, 1, 8, 8, generator=generator, dtype=torch.float64), torch.tensor([1, 4, 7])
    batched = image_error_proxy(dit, run, scores, noise, labels, 0.1)
    reference = image_error_proxy_reference(dit, run, scores, noise, labels, 0.1)
    # the last DDIM call (t=0, landing on alpha_0) returns its input whatever the output, so routing it changes nothing
    assert batched.shape == (4,) and batched[0] == 0 and (batched[1:3] > 0).all() and batched[3] < 1e-12
    torch.testing.assert_close(batched, reference, rtol=1e-9, atol=1e-15)
    ones = image_error_proxy(dit, run, torch.ones(4, 8, dtype=torch.float64), noise, labels, 0.1)
    assert torch.equal(ones, torch.zeros(4, dtype=torch.float64))  # computing everything changes nothing


def test_module_samples_through_its_exported_plan(teacher_file):
    """A router that computes everything samples what the teacher samples; a sparser one computes less."""
    module = make_module(teacher_file, init="constant", init_value=5.0)
    labels = torch.arange(3)
    plain = sample_images(module.teacher, module.objective, labels, sampler="ddim", steps=4, cfg_scale=2.0)
    assert torch.equal(module.sample(labels), plain.clamp(-1, 1))
    with torch.no_grad():
        module.router.theta[1:, ::2] = -5.0  # attention cached after the first call
    plan = module.export()
    assert plan.computed_fraction == pytest.approx((8 + 3 * 4) / 32)
    assert not torch.equal(module.sample(labels), plain.clamp(-1, 1))
