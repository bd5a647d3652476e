"""``ditlab export --ckpt RUN.ckpt --out PATH``: a method run's result in the form the sampling tools run.

A learned-cache router run (``CacheRouterModule``: L2C, HarmoniCa) becomes a static plan, a JSON file that
``ditlab sample --ckpt TEACHER --cache plan:PATH`` runs (the printed command carries the sampler, steps and guidance
the router was trained for); an ILF run (``FeedbackModule``) becomes one checkpoint holding its teacher's weights
and the feedback block; a dynamic-compute run (DyDiT, Elastic-DiT, dynamic chunking) becomes its inference form, a
plain ditlab checkpoint whose trunk slices weights, gathers tokens and skips blocks. Every export prints a command
that samples it as printed. Other runs have nothing to export (``ditlab convert`` writes a network for other
libraries).
"""

from __future__ import annotations

import shlex
from dataclasses import fields, is_dataclass
from pathlib import Path

from ditlab.checkpoint import read_checkpoint, run_settings
from ditlab.diffusion.config import SamplingConfig

SCHEDULE_FIELDS = ("sampler", "steps", "cfg_scale", "cfg_channels", "time_grid", "ddim_alpha_to_one",
                   "guidance_interval", "sde")  # fmt: skip
"""The sampling options a plan's command must carry when the teacher recorded others."""


def flag_value(value) -> str:
    """A sampling value as the command line spells it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(flag_value(item) for item in value) + "]"
    return str(value)


def sampling_flags(wanted: SamplingConfig, recorded: SamplingConfig) -> list[str]:
    """``--name value`` for each schedule option where ``wanted`` differs from what the teacher ``recorded`` (the
    defaults ``ditlab sample`` starts from)."""
    flags = []
    for name in SCHEDULE_FIELDS:
        value, default = getattr(wanted, name), getattr(recorded, name)
        if is_dataclass(value):
            flags += [f"--{name}.{item.name}={flag_value(getattr(value, item.name))}" for item in fields(value)
                      if getattr(value, item.name) != getattr(default, item.name)]  # fmt: skip
        elif value != default:
            flags.append(f"--{name}={flag_value(value)}")
    return flags


def teacher_sampling(teacher: str) -> SamplingConfig:
    """What ``ditlab sample --ckpt TEACHER`` starts from: the teacher's recorded settings, else the defaults."""
    path = Path(teacher)
    if path.suffix == ".ckpt" or (path / ".metadata").is_file():
        return run_settings(read_checkpoint(path)["ditlab"])[1]
    return SamplingConfig()


def export_plan(ckpt: str, out: str, threshold: float | None, sampler: str | None, steps: int | None) -> int:
    """A router run as a plan file, and the two commands that sample it."""
    from ditlab.methods.sampling.cache_router.export import plan_from_checkpoint

    checkpoint = read_checkpoint(ckpt)
    plan = plan_from_checkpoint(checkpoint, threshold, sampler, steps)
    plan.source = str(ckpt)
    path = plan.save(out)
    teacher = (checkpoint.get("ditlab") or {}).get("teacher") or checkpoint["cache_router"]["teacher"]
    wanted = run_settings(checkpoint["ditlab"])[1] if "ditlab" in checkpoint else SamplingConfig(
        sampler=plan.sampler, steps=plan.steps, cfg_scale=checkpoint["cache_router"]["cfg_scale"])  # fmt: skip
    command = ["ditlab", "sample", "--ckpt", teacher, *sampling_flags(wanted, teacher_sampling(teacher)),
               "--cache", f"plan:{path}"]  # fmt: skip
    print(f"wrote {path}: {plan.describe()}, {plan.computed_fraction:.1%} of the units computed; sample the teacher "
          f"through it with `{shlex.join(command)}`"
          + ("" if threshold is not None else f" (or the run itself: `ditlab sample --ckpt {shlex.quote(ckpt)}`)"))  # fmt: skip
    return 0


def export(ckpt: str, out: str, threshold: float | None = None, sampler: str | None = None,
           steps: int | None = None) -> int:  # fmt: skip
    """Export a cache-router run as a static cache plan, an ILF run with its teacher inside, or a dynamic-compute run
    in its inference form; prints the command that samples the export.

    Args:
        ckpt: a checkpoint of a cache-router, ILF or dynamic-compute run (``checkpoints/final.ckpt``).
        out: the plan file (router runs) or checkpoint file (ILF and dynamic runs) to write.
        threshold: router runs: the score above which a unit is computed; default: the one it was trained with.
        sampler: router runs: the sampler to export for; it must be the one the router was trained for.
        steps: router runs: the step count to export for; it must be the one the router was trained for.
    """
    checkpoint = read_checkpoint(ckpt)
    if "cache_router" in checkpoint:
        return export_plan(ckpt, out, threshold, sampler, steps)
    given = [name for name, value in (("threshold", threshold), ("sampler", sampler), ("steps", steps))
             if value is not None]  # fmt: skip
    if "feedback" in checkpoint:
        if given:
            raise ValueError(f"--{given[0]} applies to cache-router runs; {ckpt} is an ILF run, exported as trained")
        from ditlab.methods.sampling.feedback.export import export_checkpoint as export_feedback

        path = export_feedback(ckpt, out)
        print(f"wrote {path}: the ILF run with its teacher's weights inside; sample it with "
              f"`ditlab sample --ckpt {shlex.quote(str(path))}`")  # fmt: skip
        return 0
    trunk = checkpoint.get("ditlab", {}).get("dit_config", {}).get("trunk", "blocks")
    if trunk == "blocks":
        raise ValueError(f"{ckpt} is neither a cache-router run nor a dynamic-compute run nor an ILF run, so it has "
                         f"nothing to export; `ditlab sample --ckpt {ckpt}` samples it and `ditlab convert` writes its network "
                         "for other libraries")  # fmt: skip
    if given:
        raise ValueError(f"--{given[0]} applies to cache-router runs; {ckpt} is a dynamic-compute ({trunk}) run")
    from ditlab.methods.dynamic.export import export_checkpoint

    path = export_checkpoint(ckpt, out)
    print(f"wrote {path}: the {trunk} network in its inference form; sample it with "
          f"`ditlab sample --ckpt {shlex.quote(str(path))}`")  # fmt: skip
    return 0
