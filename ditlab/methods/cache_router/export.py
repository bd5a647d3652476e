"""Export a trained router checkpoint to a static plan that ``--cache plan --cache.path PLAN`` runs.

    python -m ditlab.methods.cache_router.export ROUTER.ckpt --out plan.json [--threshold 0.1]
        [--sampler ddim --steps 20]   # refused in one line if the router was trained for another schedule
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ditlab.methods.accel.plan import StaticPlan
from ditlab.methods.cache_router.module import check_schedule
from ditlab.models.loading import read_checkpoint


def plan_from_checkpoint(path: str | Path, threshold: float | None = None, sampler: str | None = None,
                         steps: int | None = None) -> StaticPlan:  # fmt: skip
    """The plan of the router saved at ``path``; ``sampler``/``steps``, when given, must be the router's own."""
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("cache_router")
    if saved is None:
        raise ValueError(f"{path} holds no cache router; pass a checkpoint of a CacheRouterModule run")
    if sampler is not None or steps is not None:
        check_schedule(saved, sampler or saved["sampler"], steps if steps is not None else saved["steps"])
    theta = checkpoint["state_dict"]["router.theta"]
    frozen = torch.zeros(len(theta), dtype=torch.bool)
    frozen[list(range(0, len(theta), 2)) if saved["mode"] == "l2c" else [0]] = True
    threshold = saved["threshold"] if threshold is None else threshold
    computes = (torch.sigmoid(theta) > threshold) | frozen[:, None]
    return StaticPlan(computes.tolist(), saved["times"], saved["sampler"], saved["steps"], saved["depth"], threshold,
                      source=str(path), meta={"mode": saved["mode"], "teacher": saved["teacher"]})  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threshold", type=float, default=None, help="default: the one the router was trained with")
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        plan = plan_from_checkpoint(args.checkpoint, args.threshold, args.sampler, args.steps)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    path = plan.save(args.out)
    print(f"wrote {path}: {plan.describe()}, {plan.computed_fraction:.1%} of the units computed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
