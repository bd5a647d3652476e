"""A run cut short by ``trainer.max_steps`` names, in one line at the start of fit, each stage it will not reach: the
compression module's later phases and the progressive cuts still to come."""

from __future__ import annotations

import types

import torch

from ditlab.callbacks.progressive import ProgressiveDistillation
from ditlab.methods.compress.module import DicompModule, PhaseConfig, PruneConfig
from ditlab.methods.teacher import TeacherConfig


def started(module: DicompModule, max_steps: int, callbacks: list, capsys) -> list[str]:
    module._trainer = types.SimpleNamespace(max_steps=max_steps, is_global_zero=True, callbacks=callbacks)
    module.on_fit_start()
    return [line for line in capsys.readouterr().out.splitlines() if "ends the run before" in line]


def test_cut_short_run_names_each_unreached_stage_once(teacher_file, capsys):
    module = DicompModule(teacher=TeacherConfig(checkpoint=str(teacher_file)),
                          phases=[PhaseConfig(steps=300), PhaseConfig(steps=100)],
                          prune=PruneConfig(criterion="first", num_blocks=3))  # fmt: skip
    module.build_student(torch.zeros(8, 1, 8, 8), torch.arange(8))
    stages = ProgressiveDistillation(at_steps=[20, 500], blocks=[2, 1])
    assert started(module, 40, [stages], capsys) == [
        "warning: trainer.max_steps=40 ends the run before phase model.phases[1] (from step 300); "
        "phase model.distill (from step 400); progressive stage 2 -> 1 blocks (from step 500)"
    ]  # the stage at step 20 runs: not named
    assert started(module, 500, [stages], capsys) == [
        "warning: trainer.max_steps=500 ends the run before progressive stage 2 -> 1 blocks (from step 500)"
    ]
    assert started(module, 501, [stages], capsys) == []
    assert started(module, -1, [stages], capsys) == []  # an epoch budget: no step to compare with
    stages.applied = [20]  # resumed past the first cut: the student is already 2 blocks deep
    module._trainer = None
    module.shrink(2)
    assert started(module, 40, [stages], capsys)[0].endswith("progressive stage 2 -> 1 blocks (from step 500)")


def test_alignment_termination_is_a_stage_a_cut_short_run_is_warned_about():
    from types import SimpleNamespace

    from ditlab.callbacks.alignment import AlignmentTermination

    callback = AlignmentTermination(200)
    assert callback.stage_starts(SimpleNamespace(alignment_active=True)) == [(200, "alignment termination")]
    assert callback.stage_starts(SimpleNamespace(alignment_active=False)) == []  # already terminated (a resume)
    callback.enabled = False  # a module without a termination step (REG)
    assert callback.stage_starts(SimpleNamespace(alignment_active=True)) == []
