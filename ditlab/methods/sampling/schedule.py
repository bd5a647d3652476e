"""The schedule a trained sampling-time method belongs to, and the one check that sampling uses that schedule.

A learned router's rows and a feedback block's full / feedback calls are model calls of one trajectory, so what
they learned is tied to the call times of the sampler, step count, time grid and SDE they were trained with
(``ditlab.diffusion.trajectory``). Those times are recorded in their checkpoints; another schedule is refused here,
in one line, for every family that trains on a schedule.
"""

from __future__ import annotations

import torch

from ditlab.diffusion.sample import model_call_times


def schedule_times(objective, sampler: str | None = None, steps: int | None = None, **options) -> torch.Tensor:
    """The network time of every model call of a trajectory with these sampling options (``time_grid``, ``sde``,
    ``ddim_alpha_to_one``; the others do not move the calls)."""
    times = model_call_times(objective, sampler, steps, **options)
    if times is None:
        raise ValueError(f"sampler {sampler!r} is adaptive, so its model calls are not known ahead; train and sample "
                         "a learned method with a fixed-step sampler (ddim, euler, heun, sde, ...)")  # fmt: skip
    return times


def describe(sampler: str, steps: int | None, times: list[float]) -> str:
    """``ddim at 20 steps``, or ``ddim on a 12-call time grid`` for an explicit grid."""
    return f"{sampler} at {steps} steps" if steps is not None else f"{sampler} on a {len(times)}-call time grid"


def same_times(times: list[float], other: list[float]) -> bool:
    """The same calls, up to float32 rounding of the recorded times."""
    return len(times) == len(other) and all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(times, other))


def check_schedule(saved: dict, sampler: str, steps: int | None, times: list[float] | None = None,
                   what: str = "this router") -> None:  # fmt: skip
    """One line when ``what`` was trained for the schedule ``saved`` records (its ``sampler``, ``steps`` and call
    ``times``) and is asked for another; ``times`` None compares the sampler and step count only."""
    if saved["sampler"] != sampler or saved["steps"] != steps or (times is not None and not same_times(times, saved["times"])):
        trained = describe(saved["sampler"], saved["steps"], saved["times"])
        asked = describe(sampler, steps, saved["times"] if times is None else times)
        if trained == asked:
            asked += " at other call times (another time grid or SDE end)"
        raise ValueError(f"{what} was trained for {trained}, not {asked}; sample with {trained} or train for "
                         "this schedule")  # fmt: skip


def check_teacher_sampler(objective, sampler: str | None, teacher: str) -> None:
    """One line when the configured ``sampler`` does not fit the teacher's objective (a DDIM router on a flow teacher):
    the teacher is named as the mismatch, since the run's sampler was set for the other kind."""
    if sampler is None or sampler in objective.samplers:
        return
    flow = "flow" in type(objective).__name__.lower()
    kind, other = ("a flow (SiT)", "a DDPM (DiT)") if flow else ("a DDPM (DiT)", "a flow (SiT)")
    raise ValueError(f"the teacher {teacher} is {kind} model, and the run's sampler {sampler!r} "
                     f"(model.init_args.sampling.sampler) is for {other} one; give {other} teacher "
                     f"(model.init_args.teacher.checkpoint) or a sampler of the teacher's: {list(objective.samplers)}")
