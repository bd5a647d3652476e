"""Learned routers and ILF on any schedule the sampler takes: an explicit or named time grid and a guidance interval
(both refused by the routers and feedback before they stepped through ``ditlab.diffusion.trajectory``)."""

from __future__ import annotations

import pytest
import torch

from ditlab.cli import main
from ditlab.diffusion.config import SamplingConfig
from ditlab.diffusion.sample import sample_images
from ditlab.methods.sampling.cache_router import CacheRouterModule, RouterConfig, routed_call
from ditlab.methods.sampling.feedback import FeedbackConfig, FeedbackModule
from ditlab.methods.teacher import TeacherConfig

GRID = [999, 700, 450, 250, 100, 0]  # an explicit DDIM grid of 6 calls
INTERVAL = (0.0, 0.5)  # guided on the last calls only: the rows change mid-trajectory
SAMPLING = {"sampler": "ddim", "steps": None, "time_grid": GRID, "cfg_scale": 2.0, "guidance_interval": INTERVAL}


def make_router(teacher_file, mode: str = "harmonica", **router) -> CacheRouterModule:
    module = CacheRouterModule(teacher=TeacherConfig(checkpoint=str(teacher_file)),
                               router=RouterConfig(mode=mode, **router), sampling=SamplingConfig(**SAMPLING))  # fmt: skip
    module.configure_model()
    return module


def test_routed_call_drops_its_cache_when_the_rows_change(tiny_dit, dit_inputs):
    dit = tiny_dit(depth=4)
    x, t, y = dit_inputs(dit)
    cache = {}
    routed_call(dit, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), torch.zeros(8), cache, 0.1)
    assert all(len(value) == 2 * len(x) for value in cache.values())
    t2 = t * 0.5
    assert torch.equal(routed_call(dit, x, t2, y, torch.zeros(8), cache, 0.1), dit(x, t2, y))  # computed in full
    assert all(len(value) == len(x) for value in cache.values())


@pytest.mark.parametrize("mode", ["harmonica", "l2c"])
def test_a_router_trains_and_samples_on_an_explicit_grid_with_a_guidance_interval(teacher_file, mode):
    module = make_router(teacher_file, mode, sparsity=1e-2, init="constant", init_value=0.0)
    assert module.router.calls == len(GRID)
    optimizer = torch.optim.AdamW([module.router.theta], lr=0.5)
    start = module.router.theta.detach().clone()
    rows = set()
    for _ in range(2 * len(GRID)):
        if mode == "harmonica":
            terms, _ = module.rollout_terms(4)
            rows.add(len(next(iter(module.rollout_cache.values()))))  # the rows of the call just trained
        else:
            terms, _ = module.pair_terms(torch.randn(4, 1, 8, 8), torch.arange(4))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        module.router.clamp_()
        assert torch.isfinite(terms["loss"])
    assert not torch.equal(module.router.theta, start)
    if mode == "harmonica":
        assert rows == {4, 8}  # conditional-only and [cond; uncond] calls in one trajectory
    plan = module.export()
    assert plan.steps is None and len(plan.times) == len(GRID)
    labels = torch.arange(3)
    images = module.sample(labels)
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="trained for ddim on a 6-call time grid, but .* 6 model calls at other times"):
        module.sample(labels, time_grid="trailing", steps=6)


def test_a_router_that_computes_everything_samples_the_teacher_bitwise_on_the_grid(teacher_file):
    module = make_router(teacher_file, init="constant", init_value=5.0)
    labels = torch.arange(3)
    plain = sample_images(module.teacher, module.objective, labels, **SAMPLING)
    assert torch.equal(module.sample(labels), plain.clamp(-1, 1))


@pytest.mark.parametrize("mode", ["harmonica", "l2c"])
def test_a_router_trains_and_samples_on_the_sde_of_a_flow_teacher(tmp_path, tiny_dit, mode):
    from dataclasses import asdict

    from ditlab.diffusion.config import ObjectiveConfig

    dit = tiny_dit(depth=2)
    teacher = tmp_path / "flow.ckpt"
    torch.save({"state_dict": {f"network.{key}": value for key, value in dit.state_dict().items()},
                "ditlab": {"dit_config": dit.config.to_dict(), "objective": asdict(ObjectiveConfig(kind="flow")),
                           "sampling": asdict(SamplingConfig(sampler="euler", steps=4))}}, teacher)  # fmt: skip
    sampling = SamplingConfig(sampler="sde", steps=6, time_grid="sit", cfg_scale=2.0, guidance_interval=INTERVAL)
    module = CacheRouterModule(TeacherConfig(checkpoint=str(teacher)), RouterConfig(mode=mode), sampling=sampling)
    module.configure_model()
    assert module.router.calls == 6  # six Euler-Maruyama calls down to the SDE's last step
    for _ in range(3):
        terms, _ = module.rollout_terms(4) if mode == "harmonica" else module.pair_terms(torch.randn(4, 1, 8, 8),
                                                                                        torch.arange(4))  # fmt: skip
        terms["loss"].backward()
        assert torch.isfinite(terms["loss"]) and module.router.theta.grad.abs().sum() > 0
    assert module.sample(torch.arange(2)).shape == (2, 1, 8, 8)


def test_feedback_trains_on_a_named_grid_with_a_guidance_interval(teacher_file):
    sampling = SamplingConfig(sampler="ddim", steps=6, time_grid="trailing", cfg_scale=2.0, guidance_interval=INTERVAL)
    module = FeedbackModule(TeacherConfig(checkpoint=str(teacher_file)), FeedbackConfig(source=1), sampling=sampling)
    module.configure_model()
    assert len(module.schedule()) == 6
    for _ in range(4):
        terms = module.feedback_terms(4)
        module.feedback.zero_grad()
        terms["loss"].backward()
        assert torch.isfinite(terms["loss"]) and module.feedback.gamma.grad.abs() > 0
        assert not module.full_call(module.trajectory.index - 1)


def test_l2c_from_the_cli_on_a_trailing_grid_with_an_interval_exports_and_samples(tmp_path, teacher_file, router_args,
                                                                                 capsys):  # fmt: skip
    schedule = ["--model.init_args.sampling.time_grid", "trailing", "--model.init_args.sampling.guidance_interval",
                "[0.0, 0.5]"]  # fmt: skip
    assert main([*router_args(teacher_file, tmp_path / "runs", "l2c.yaml", steps=3), *schedule]) == 0
    ckpt = next((tmp_path / "runs").glob("l2c/version_0/checkpoints/final.ckpt"))
    plan = tmp_path / "plan.json"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(plan)]) == 0
    sample = ["sample", "--ckpt", str(teacher_file), "--num", "3", "--sampler", "ddim", "--steps", "4",
              "--cache", f"plan:{plan}", "--guidance_interval", "[0.0, 0.5]"]  # fmt: skip
    assert main([*sample, "--out", str(tmp_path / "samples"), "--time_grid", "trailing"]) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) == 3
    capsys.readouterr()
    assert main([*sample, "--out", str(tmp_path / "other")]) == 2  # the scheduler's own grid: other call times
    assert "model calls at other times" in capsys.readouterr().err
