"""Inner Loop Feedback: the feedback policy's wiring and cost, and FeedbackModule's training and checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from ditlab.checkpoint import read_checkpoint
from ditlab.cli import main
from ditlab.diffusion import GaussianDiffusion
from ditlab.diffusion.config import SamplingConfig
from ditlab.diffusion.sample import model_call_times, sample_images
from ditlab.methods.sampling.feedback import FeedbackBlock, FeedbackConfig, FeedbackModule, FeedbackPolicy
from ditlab.methods.teacher import TeacherConfig
from ditlab.models.taps import run_block_range

OBJECTIVE = GaussianDiffusion(learn_sigma=True)
SCHEDULE = model_call_times(OBJECTIVE, "ddim", 4)


def sample(model, labels) -> torch.Tensor:
    return sample_images(model, OBJECTIVE, labels, seed=3, sampler="ddim", steps=4, cfg_scale=2.0, batch_size=8,
                         shape=(1, 8, 8), null_label=10)  # fmt: skip


def test_zero_scale_is_reusing_the_source_blocks_features(tiny_dit, perturb, dit_inputs):
    dit = tiny_dit(depth=4)
    block = perturb(FeedbackBlock(dit.blocks[1]), seed=5)  # a feedback block that would change h if gamma were not 0
    with torch.no_grad():
        block.gamma.zero_()
    labels = torch.arange(5)
    reuse = FeedbackPolicy(dit, SCHEDULE, None, source=1)
    assert torch.equal(sample(FeedbackPolicy(dit, SCHEDULE, block, source=1), labels), sample(reuse, labels))
    # reuse, by hand: call 1 runs blocks 2..3 on call 0's block-1 output, under call 1's condition
    x, _, y = dit_inputs(dit)
    t0, t1 = torch.full((3,), 750.0), torch.full((3,), 500.0)
    tokens, cond = dit.embed(x, t0, y)
    kept = run_block_range(dit, tokens, cond, range(2))
    _, cond = dit.embed(x * 0.5, t1, y)
    expected = dit.head(run_block_range(dit, kept, cond, range(2, 4)), cond)
    policy = FeedbackPolicy(dit, torch.tensor([750.0, 500.0]), block, source=1, warmup=0, interval=2)
    policy(x, t0, y)
    assert torch.equal(policy(x * 0.5, t1, y), expected)


def test_feedback_sees_the_current_condition_and_costs_what_it_runs(tiny_dit, dit_inputs):
    dit = tiny_dit(depth=4)
    block = FeedbackBlock(dit.blocks[0], gamma=0.3)
    seen = []
    block.register_forward_hook(lambda module, args, output: seen.append(args[1]))
    x, _, y = dit_inputs(dit)
    policy = FeedbackPolicy(dit, torch.tensor([750.0, 500.0]), block, source=0, reentry=1)
    t0, t1 = torch.full((3,), 750.0), torch.full((3,), 500.0)
    policy(x, t0, y)
    policy(x, t1, y)
    assert len(seen) == 1 and torch.equal(seen[0], dit.embed(x, t1, y)[1])
    # full call: 2 x 4 branches; feedback call: blocks 1..3 plus the feedback block = (L - r + 1) / L of a full one
    assert policy.work["computed"] == 3 * (8 + 2 * (4 - 1 + 1))
    inner = FeedbackPolicy(dit, torch.tensor([750.0, 500.0]), block, source=2, reentry=1)
    inner(x, t0, y), inner(x, t1, y)
    assert inner.work["computed"] == 3 * (8 + 2 * (4 - 1 + 1))


def test_bad_wiring_is_one_line(tiny_dit):
    dit = tiny_dit(depth=4)
    with pytest.raises(ValueError, match="source block 3 must be in \\[0, 2\\]"):
        FeedbackPolicy(dit, SCHEDULE, None, source=3)
    with pytest.raises(ValueError, match="re-entry block 3 must be in \\[0, 2\\]"):
        FeedbackPolicy(dit, SCHEDULE, None, source=1, reentry=3)


def test_only_the_feedback_block_learns_and_starts_as_the_source_block(teacher_file):
    module = FeedbackModule(TeacherConfig(checkpoint=str(teacher_file)), FeedbackConfig(source=1),
                            sampling=SamplingConfig(sampler="ddim", steps=4, cfg_scale=2.0))  # fmt: skip
    module.configure_model()
    source = module.teacher.blocks[1].state_dict()
    assert all(torch.equal(value, source[key]) for key, value in module.feedback.block.state_dict().items())
    before = copy.deepcopy(module.teacher.state_dict())
    for _ in range(3):
        terms = module.feedback_terms(4)
        module.feedback.zero_grad()
        terms["loss"].backward()
        assert module.feedback.gamma.grad.abs() > 0
        assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
        assert not module.full_call(module.trajectory.index - 1)  # what was trained was a feedback call
    assert all(torch.equal(before[key], value) for key, value in module.teacher.state_dict().items())
    assert {key.split(".")[0] for key in module.state_dict()} == {"feedback"}


def test_fit_saves_the_feedback_block_alone_and_resumes_exactly(tmp_path, teacher_file, router_args):
    common = ["--model.init_args.feedback.source", "1", "--model.init_args.lr", "1e-2"]
    assert main([*router_args(teacher_file, tmp_path / "straight", steps=4), *common]) == 0
    assert main([*router_args(teacher_file, tmp_path / "first", steps=3), *common]) == 0
    first = tmp_path / "first/ilf/version_0/checkpoints/final.ckpt"
    assert read_checkpoint(first)["feedback"]["trajectory"]["index"] == 2  # stopped inside a trajectory
    assert main([*router_args(teacher_file, tmp_path / "first", steps=4), *common, "--ckpt_path", str(first)]) == 0
    straight = read_checkpoint(tmp_path / "straight/ilf/version_0/checkpoints/final.ckpt")["state_dict"]
    resumed = read_checkpoint(tmp_path / "first/ilf/version_1/checkpoints/final.ckpt")["state_dict"]
    assert {key.split(".")[0] for key in straight} == {"feedback"} and straight["feedback.gamma"] != 0
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
