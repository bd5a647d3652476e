"""OFA-KD: the target enhancement, exit heads in the prediction space, zero loss for heads that reproduce the
teacher, and DiT -> DiCo distillation whose loss falls, through the functions and through the training module."""

from __future__ import annotations

import copy

import pytest
import torch

from ditlab.methods.compress.ofa_kd import (
    OFAConfig,
    OFADistillModule,
    OFAHeads,
    default_stages,
    enhanced_target,
    enhancement,
    ofa_losses,
)
from ditlab.methods.teacher import TeacherConfig
from ditlab.models.config import DiTConfig

DICO = DiTConfig(input_size=8, patch_size=1, in_channels=1, hidden_size=16, depth=5, num_heads=2, num_classes=10,
                 block="dico", trunk="dico", trunk_options={"stages": [1, 1, 1, 1, 1]}, mlp_ratio=2.0,
                 positions="none", learn_sigma=True)  # fmt: skip
"""A DiCo hourglass on the tiny teacher's 8x8 inputs: 8x8 tokens of width 16, 4x4 of 32, 2x2 of 64."""


def test_enhancement_is_zero_at_eps_one_and_grows_with_eps_and_teacher_confidence():
    p = torch.linspace(0, 1, 21)
    assert torch.equal(enhancement(p, 1.0), torch.zeros_like(p))
    previous = torch.zeros_like(p)
    for eps in (1.25, 1.5, 2.0, 3.0):
        lam = enhancement(p, eps)
        assert lam[0] == 0 and lam[-1] == pytest.approx(1.0)
        assert torch.all(lam[1:] >= lam[:-1] - 1e-6) and torch.all(lam >= previous - 1e-6)
        # the two-outcome reading: the share of the gap to the ground truth the exponent closes, (m - p) / (1 - p)
        inner = p[1:-1]
        mass = ((1 + inner) ** eps - 1) / ((1 + inner) ** eps - 1 + (1 - inner) ** eps)
        torch.testing.assert_close(lam[1:-1], (mass - inner) / (1 - inner))
        previous = lam
    with pytest.raises(ValueError, match="at least 1"):
        OFAConfig(eps=0.5)


def test_enhanced_target_moves_a_confident_teacher_towards_the_ground_truth():
    generator = torch.Generator().manual_seed(0)
    truth = torch.randn(4, 1, 8, 8, generator=generator)
    off = torch.tensor([0.05, 0.3, 1.0, 3.0]).view(-1, 1, 1, 1)  # the teacher's error grows by row
    teacher = truth + off * torch.randn(4, 1, 8, 8, generator=generator)
    assert torch.equal(enhanced_target(teacher, truth, eps=1.0), teacher)
    goal = enhanced_target(teacher, truth, eps=2.0)
    share = ((goal - teacher).flatten(1).norm(dim=1) / (truth - teacher).flatten(1).norm(dim=1))
    assert torch.all(share[:-1] > share[1:])  # the closer the teacher, the more of its gap is closed
    assert torch.all((share > 0) & (share < 1))


def test_default_stages(tiny_dit):
    assert default_stages(tiny_dit(depth=8)) == [1, 3, 5]
    assert default_stages(DICO.build()) == [0, 1, 2, 3]  # the hourglass's stage ends but the last


def test_zero_loss_when_the_student_heads_are_the_teachers(tiny_dit, dit_inputs):
    teacher = tiny_dit(depth=4).requires_grad_(False)
    student = copy.deepcopy(teacher)
    last = teacher.depth - 1
    heads = OFAHeads.build(student, stages=[last], head_blocks=0, channels=teacher.out_channels)
    head = heads.heads[str(last)]
    with torch.no_grad():  # the exit head after the last block is the teacher's own final layer
        head.adaLN_modulation.load_state_dict(teacher.final_layer.adaLN_modulation.state_dict())
        head.linear.load_state_dict(teacher.final_layer.linear.state_dict())
    x, t, y = dit_inputs(teacher, size=4)
    for eps, target in [(1.0, torch.randn(4, 1, 8, 8)), (2.0, None)]:
        goal = teacher(x, t, y)[:, :1] if target is None else target  # eps > 1: zero when the teacher is right
        terms, output = ofa_losses(student, teacher, heads, x, t, y, goal, eps=eps)
        assert float(terms["loss_kd_ofa"]) == pytest.approx(0.0, abs=1e-10)
        assert float(terms["loss_kd_output"]) == pytest.approx(0.0, abs=1e-10)
        assert output.shape == teacher(x, t, y).shape
    terms, _ = ofa_losses(student, teacher, heads, x, t, y, torch.randn(4, 1, 8, 8), eps=2.0)
    assert float(terms["loss_kd_output"]) > 1e-4  # the enhanced target differs from a teacher that is wrong


def test_dit_to_dico_ofa_loss_falls(tiny_dit, dit_inputs):
    teacher = tiny_dit(depth=4).requires_grad_(False)
    torch.manual_seed(0)
    student = DICO.build().train()
    heads = OFAHeads.build(student)
    assert heads.stages == [0, 1, 2, 3]
    assert [heads.heads[str(s)].patch for s in heads.stages] == [1, 2, 4, 2]  # each level's tokens cover 4^l pixels
    x, t, y = dit_inputs(teacher, size=16)
    target = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW([*student.parameters(), *heads.parameters()], lr=3e-3)
    history = []
    for _ in range(20):
        terms, _ = ofa_losses(student, teacher, heads, x, t, y, target, eps=1.5, force_drop_ids=torch.zeros_like(y))
        loss = terms["loss_kd_ofa"] + terms["loss_kd_output"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({name: float(value) for name, value in terms.items()})
    assert history[-1]["loss_kd_ofa"] < 0.5 * history[0]["loss_kd_ofa"], history
    assert history[-1]["loss_kd_output"] < history[0]["loss_kd_output"], history


def test_the_module_trains_a_dico_student_against_a_dit_teacher(teacher_file):
    def module(ofa: OFAConfig) -> OFADistillModule:
        built = OFADistillModule(teacher=TeacherConfig(checkpoint=str(teacher_file)), student=DICO, ofa=ofa,
                                 ema_decay=None)  # fmt: skip
        built.configure_model()
        return built

    ofa = module(OFAConfig(eps=1.5, head_blocks=1))
    assert ofa.network.config.block == "dico" and ofa.ofa_heads.stages == [0, 1, 2, 3]
    assert ofa.summary["ofa"]["teacher"]["block"] == "dit" and ofa.summary["ofa"]["student"]["trunk"] == "dico"
    trainable = {id(p) for p in ofa.trainable_parameters()}
    assert all(id(p) in trainable for p in ofa.ofa_heads.parameters())
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 1, 8, 8, generator=generator).clamp(-1, 1), torch.randint(0, 10, (8,), generator=generator)
    terms = ofa.training_losses(images, labels)
    assert {"loss", "loss_kd_ofa", "loss_kd_output", "loss_diffusion", "loss_vb"} <= set(terms)
    assert torch.isfinite(terms["loss"]) and float(terms["loss_kd_ofa"]) > 0
    terms["loss"].backward()
    assert all(p.grad is not None for p in ofa.ofa_heads.parameters() if p.requires_grad)
    plain = module(OFAConfig(weight=0.0, eps=1.0))  # plain output KD, the baseline OFA-KD is compared with
    assert plain.ofa_heads is None and float(plain.training_losses(images, labels)["loss_kd_ofa"]) == 0.0
