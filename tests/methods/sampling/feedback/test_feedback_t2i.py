"""Inner Loop Feedback on text-to-image teachers (PixArt and MM-DiT blocks): the feedback block is a copy of the
teacher's block of that kind, trained on trajectories of digit-scene captions guided against the empty caption; its
loss falls within a few steps, it samples through the teacher, and a checkpoint keeps its trajectory's captions."""

from __future__ import annotations

import pytest
import torch

from ditlab.diffusion.config import SamplingConfig
from ditlab.diffusion.guidance import EMPTY_CAPTION
from ditlab.diffusion.sample import sample_images
from ditlab.methods.sampling.feedback import FeedbackConfig, FeedbackModule
from ditlab.methods.teacher import TeacherConfig
from ditlab.models.text.features import TextFeatures
from ditlab.models.text.prompts import condition_input

KINDS = ("pixart", "mmdit")


def make_module(teacher_file) -> FeedbackModule:
    module = FeedbackModule(TeacherConfig(checkpoint=str(teacher_file)), FeedbackConfig(source=1, interval=2),
                            sampling=SamplingConfig(sampler="ddim", steps=4, cfg_scale=2.0), lr=1e-2)  # fmt: skip
    module.configure_model()
    return module


def held_out_loss(module: FeedbackModule) -> float:
    """The loss of 2 feedback calls from fixed draws (the same noise and captions before and after training)."""
    module.seed_training_draws(123)
    module.trajectory = None
    with torch.no_grad():
        return sum(float(module.feedback_terms(4)["loss"]) for _ in range(2))


@pytest.mark.parametrize("kind", KINDS)
def test_the_feedback_block_trains_on_captions_and_its_loss_falls(text_teacher_file, kind):
    module = make_module(text_teacher_file(kind))
    teacher = module.teacher
    assert type(module.feedback.block) is type(teacher.blocks[1])  # a copy of the teacher's block kind
    before = held_out_loss(module)
    optimizer = torch.optim.AdamW(module.feedback.parameters(), lr=1e-2)
    module.seed_training_draws(0)
    module.trajectory = None
    for _ in range(10):
        terms = module.feedback_terms(4)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    trajectory = module.trajectory
    assert isinstance(trajectory.labels, TextFeatures) and trajectory.guidance.null_label == EMPTY_CAPTION
    assert all(isinstance(caption, str) and caption for caption in module.trajectory_labels)
    assert held_out_loss(module) < 0.8 * before
    assert module.feedback.gamma.item() != 0
    features = condition_input(teacher.config, ["a red 3", "two blue digits"])
    policy = module.model_function()
    cached = sample_images(policy, module.objective, features, sampler="ddim", steps=4, cfg_scale=2.0)
    plain = sample_images(teacher, module.objective, features, sampler="ddim", steps=4, cfg_scale=2.0)
    assert torch.isfinite(cached).all() and not torch.allclose(cached, plain, atol=1e-5)
    assert policy.computed_share < 1.0


def test_a_checkpoint_keeps_the_trajectorys_captions_and_resumes_on_them(text_teacher_file):
    module = make_module(text_teacher_file("mmdit"))
    module.seed_training_draws(0)
    module.feedback_terms(4)
    checkpoint = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    saved = checkpoint["feedback"]["trajectory"]
    assert saved["labels"] == module.trajectory_labels and all(isinstance(c, str) for c in saved["labels"])
    resumed = make_module(text_teacher_file("mmdit"))
    resumed.on_load_checkpoint(checkpoint)
    assert torch.equal(resumed.trajectory.labels.tokens, module.trajectory.labels.tokens)
    assert torch.equal(resumed.hidden, module.hidden) and resumed.trajectory.index == module.trajectory.index
