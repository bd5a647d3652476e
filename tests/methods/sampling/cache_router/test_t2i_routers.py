"""Learned caching (HarmoniCa, Learning-to-Cache) on text-to-image teachers (PixArt and MM-DiT blocks): trained on
digit-scene captions encoded by the teacher's text encoder, the empty caption as the null condition; the router has a
column per unit of the teacher (three per PixArt block); its loss falls within a few steps; its plan samples; a
checkpoint stores the rollout's captions as text; a caption-less batch for L2C is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ditlab.checkpoint import read_checkpoint
from ditlab.cli import main
from ditlab.diffusion.config import SamplingConfig
from ditlab.diffusion.guidance import EMPTY_CAPTION
from ditlab.diffusion.sample import sample_images
from ditlab.methods.sampling.cache_router import CacheRouterModule, RouterConfig
from ditlab.methods.sampling.caches.plan import Plan
from ditlab.methods.sampling.conditions import batch_conditions
from ditlab.methods.teacher import TeacherConfig
from ditlab.models.text.features import TextFeatures
from ditlab.models.text.prompts import condition_input

ROOT = Path(__file__).resolve().parents[4]
KINDS = ("pixart", "mmdit")
CAPTIONS = ["one red 3 on the left", "a blue 7 above a green 2", "two yellow digits", "a 5"]


def make_module(teacher_file, mode: str = "harmonica", **router) -> CacheRouterModule:
    settings = {"sparsity": 1e-2, "init": "constant", **router}
    module = CacheRouterModule(teacher=TeacherConfig(checkpoint=str(teacher_file)),
                               router=RouterConfig(mode=mode, **settings),
                               sampling=SamplingConfig(sampler="ddim", steps=4, cfg_scale=2.0))  # fmt: skip
    module.configure_model()
    return module


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(len(CAPTIONS), 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def terms_of(module: CacheRouterModule, mode: str) -> dict:
    return module.rollout_terms(len(CAPTIONS))[0] if mode == "harmonica" else module.pair_terms(images(), CAPTIONS)[0]


def held_out_loss(module: CacheRouterModule, mode: str) -> float:
    """The loss of 3 training steps from fixed draws (the same noise, captions and calls before and after)."""
    module.seed_training_draws(123)
    module.rollout = None
    with torch.no_grad():
        return sum(float(terms_of(module, mode)["loss"]) for _ in range(3))


@pytest.mark.parametrize("mode", ["harmonica", "l2c"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_router_trains_on_captions_and_its_loss_falls(text_teacher_file, kind, mode):
    module = make_module(text_teacher_file(kind), mode)
    teacher = module.teacher
    assert module.router.theta.shape == (4, len(teacher.units()))
    assert module.router.units == (12 if kind == "pixart" else 8)  # PixArt: self-attention, cross-attention, MLP
    before = held_out_loss(module, mode)
    optimizer = torch.optim.AdamW([module.router.theta], lr=0.5)
    module.seed_training_draws(0)
    module.rollout = None
    for _ in range(12):
        terms = terms_of(module, mode)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        module.router.clamp_()
    assert held_out_loss(module, mode) < 0.5 * before


@pytest.mark.parametrize("kind", KINDS)
def test_rollouts_are_captions_guided_against_the_empty_caption(text_teacher_file, kind):
    module = make_module(text_teacher_file(kind), label_dropout=0.5)
    module.seed_training_draws(0)
    module.rollout_terms(16)
    rollout = module.rollout
    assert isinstance(rollout.labels, TextFeatures) and len(rollout.labels) == 16
    assert rollout.guidance.null_label == EMPTY_CAPTION
    drawn = module.rollout_labels
    assert all(isinstance(caption, str) for caption in drawn) and 0 < drawn.count("") < 16  # dropped: empty caption
    null = rollout.labels.null_rows(1)
    dropped = [i for i, caption in enumerate(drawn) if caption == ""]
    assert torch.equal(rollout.labels.tokens[dropped], null.tokens.expand(len(dropped), -1, -1))
    module.seed_training_draws(0)
    module.rollout = None
    module.rollout_terms(16)
    assert module.rollout_labels == drawn  # the draws are the training stream's


def test_a_checkpoint_keeps_the_rollouts_captions_as_text_and_resumes_on_them(text_teacher_file):
    module = make_module(text_teacher_file("mmdit"))
    module.seed_training_draws(0)
    module.rollout_terms(4)
    checkpoint = {"state_dict": {"router.theta": module.router.theta.detach().clone()}}
    module.on_save_checkpoint(checkpoint)
    saved = checkpoint["cache_router"]["rollout"]
    assert saved["labels"] == module.rollout_labels and all(isinstance(c, str) for c in saved["labels"])
    resumed = make_module(text_teacher_file("mmdit"))
    resumed.on_load_checkpoint(checkpoint)
    assert torch.equal(resumed.rollout.labels.tokens, module.rollout.labels.tokens)
    assert torch.equal(resumed.rollout.x, module.rollout.x) and resumed.rollout.index == module.rollout.index


@pytest.mark.parametrize("kind", KINDS)
def test_the_image_error_proxy_and_the_exported_plan_run_on_captions(text_teacher_file, kind):
    module = make_module(text_teacher_file(kind), init_value=0.0)
    proxy = module.refresh_weights(2, 0)
    assert proxy.shape == (4,) and proxy[0] == 0 and torch.isfinite(proxy).all()
    with torch.no_grad():
        module.router.theta[1:, ::2] = -5.0  # every other unit reused after the first call
    teacher = module.teacher
    plan = module.export()
    assert len(plan.compute[0]) == len(teacher.units()) and plan.computed_fraction < 1
    features = condition_input(teacher.config, CAPTIONS[:3])
    policy = Plan(teacher, module.schedule(), plan=plan)
    plain = sample_images(teacher, module.objective, features, sampler="ddim", steps=4, cfg_scale=2.0)
    cached = sample_images(policy, module.objective, features, sampler="ddim", steps=4, cfg_scale=2.0)
    assert torch.isfinite(cached).all() and not torch.allclose(cached, plain, atol=1e-5)
    assert policy.computed_share < 1.0
    sampled = module.sample(CAPTIONS[:3])  # the module's own path: captions in, the teacher through its plan
    assert sampled.shape == (3, 1, 8, 8) and torch.isfinite(sampled).all()


def test_l2c_without_captions_in_its_batches_is_refused_in_one_line(text_teacher_file):
    module = make_module(text_teacher_file("pixart"), "l2c")
    with pytest.raises(ValueError, match="trains on \\(image, caption\\) pairs") as error:
        batch_conditions(module.teacher, (images(), torch.arange(4)), "Learning-to-Cache")
    assert "\n" not in str(error.value)
    assert batch_conditions(module.teacher, (images(), torch.arange(4), CAPTIONS), "L2C") == CAPTIONS


def test_harmonica_fit_on_a_text_teacher_resumes_mid_trajectory_exactly(tmp_path, text_teacher_file, router_args):
    """Through ``ditlab fit`` (the data only drives the loop): 5 steps straight, or 4 (inside the second trajectory,
    its captions saved as text) then 1 more: the same router."""
    teacher = text_teacher_file("pixart")
    assert main(router_args(teacher, tmp_path / "straight", steps=5)) == 0
    assert main(router_args(teacher, tmp_path / "first", steps=4)) == 0
    first = next((tmp_path / "first").glob("harmonica/version_0"))
    rollout = read_checkpoint(first / "checkpoints" / "final.ckpt")["cache_router"]["rollout"]
    assert rollout["index"] == 2 and all(isinstance(caption, str) for caption in rollout["labels"])
    assert main([*router_args(teacher, tmp_path / "first", steps=5), "--ckpt_path",
                 str(first / "checkpoints" / "final.ckpt")]) == 0  # fmt: skip
    final = {name: read_checkpoint(next((tmp_path / name).glob(f"harmonica/version_{v}")) / "checkpoints" / "final.ckpt")
             for name, v in (("straight", 0), ("first", 1))}  # fmt: skip
    assert torch.equal(final["first"]["state_dict"]["router.theta"], final["straight"]["state_dict"]["router.theta"])


def test_l2c_fit_on_digit_scenes_with_captions_exports_a_plan_that_samples(tmp_path, text_network):
    """L2C's pairs from the scenes' images and captions (a 32x32 MM-DiT teacher), exported and sampled from prompts."""
    from ditlab.diffusion.config import ObjectiveConfig
    from ditlab.models.loading import network_checkpoint

    network = text_network("mmdit", input_size=32, in_channels=3, patch_size=8, depth=2)
    teacher = tmp_path / "teacher.ckpt"
    torch.save(network_checkpoint(network.eval(), ObjectiveConfig(), SamplingConfig(sampler="ddim", steps=4,
                                                                                    cfg_scale=2.0)), teacher)  # fmt: skip
    assert main(["fit", "--config", str(ROOT / "configs" / "l2c.yaml"), "--model.init_args.teacher.checkpoint",
                 str(teacher), "--model.init_args.sampling.steps", "4", "--data.class_path",
                 "ditlab.data.scenes.ScenesDataModule", "--data.init_args.image_size", "32", "--data.init_args.captions",
                 "true", "--data.init_args.batch_size", "4", "--data.init_args.train_length", "16",
                 "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false",
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]) == 0  # fmt: skip
    ckpt = next((tmp_path / "runs").glob("l2c/version_0/checkpoints/final.ckpt"))
    plan = tmp_path / "plan.json"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(plan), "--threshold", "0.5"]) == 0
    assert main(["sample", "--ckpt", str(teacher), "--prompt", "a red 3", "--num", "2", "--sampler", "ddim",
                 "--steps", "4", "--cache", f"plan:{plan}", "--out", str(tmp_path / "samples")]) == 0  # fmt: skip
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2
