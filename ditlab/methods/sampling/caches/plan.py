"""``plan``: run a static compute plan, a boolean table ``[model calls, units]`` saying which branch is computed
at which call; every other branch reuses its last computed output (gates recomputed, as in every cache here).

Learned routers (Learning-to-Cache, Ma et al., NeurIPS 2024, horseee/learning-to-cache; HarmoniCa, Huang et al.,
ICML 2025, ModelTC/HarmoniCa) decide per sampling step and per attention / MLP branch what to recompute; once
trained, a router at a threshold is exactly such a table (``ditlab.methods.sampling.cache_router`` exports it). Units are
the trunk's global numbering (``DiT.units()``): ``2 * block + (0 attention, 1 MLP)`` on DiT blocks, three per PixArt
block (self-attention, cross-attention, MLP), and per MM-DiT block its joint attention and two-stream MLP, each
holding both streams, so a plan reuses the text and image rows of a unit together. A plan is tied to the sampler and step count it was trained for (its
rows are those calls), so it records them and refuses any other schedule in one line.

    ditlab sample --ckpt teacher.ckpt --sampler ddim --steps 20 --cache plan:router_plan.json
    (in a config: ``sampling.cache: {policy: plan, options: {path: router_plan.json}}``)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ditlab.methods.sampling.caches.policy import CachePolicy, register_policy
from ditlab.methods.sampling.schedule import check_schedule, describe, same_times
from ditlab.models.taps import Branch


def unit_index(block: int, kind: str) -> int:
    """The column of a DiT block's branch in a ``[calls, 2 * depth]`` plan or router (other block kinds: ``branch.unit``)."""
    return 2 * block + (kind == "mlp")


@dataclass
class StaticPlan:
    """Which units each model call computes, and the schedule the table belongs to.

    Args:
        compute: ``[calls][units]`` booleans, one per unit of the network's trunk (``ditlab.models.trunk``; a DiT
            block's units are its attention, then its MLP).
        times: network time of every model call (``ditlab.diffusion.sample.model_call_times``).
        sampler: the sampler the plan was trained for.
        steps: its step count.
        depth: blocks of the network it was trained on.
        threshold: the router threshold it was exported at (informational).
        source: where it came from (a router checkpoint).
    """

    compute: list[list[bool]]
    times: list[float]
    sampler: str
    steps: int | None
    depth: int
    threshold: float = math.nan
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        widths = {len(row) for row in self.compute}
        if len(self.compute) != len(self.times) or len(widths) != 1 or min(widths) % max(self.depth, 1):
            raise ValueError(f"a cache plan needs one row of units (the same whole number per block of its "
                             f"{self.depth}) per model call ({len(self.times)} calls); got {len(self.compute)} rows "
                             f"of {sorted(widths)} units")  # fmt: skip

    @property
    def table(self) -> torch.Tensor:
        return torch.tensor(self.compute, dtype=torch.bool)

    @property
    def computed_fraction(self) -> float:
        return float(self.table.float().mean())

    def describe(self) -> str:
        calls = f" ({len(self.times)} model calls)" if self.steps is not None else ""
        return describe(self.sampler, self.steps, self.times) + calls

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> StaticPlan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cache plan {path} does not exist; export one from a router checkpoint "
                                    "(ditlab export --ckpt ROUTER.ckpt --out PLAN.json)")  # fmt: skip
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path} is not a ditlab cache plan ({type(error).__name__}); export one with "
                             "ditlab export --ckpt ROUTER.ckpt --out PLAN.json") from None  # fmt: skip


@dataclass
class PlanOptions:
    """The plan policy's knob.

    Args:
        path: the static plan file (JSON) a learned router was exported to (``ditlab export``).
    """

    path: str | None = None


@register_policy
class Plan(CachePolicy):
    """Computes the units the plan marks, reuses the rest; the first call computes everything it has no cache for."""

    name = "plan"
    Options = PlanOptions
    routed_trunks = True

    def __init__(self, dit, schedule, plan: StaticPlan | None = None, **settings) -> None:
        self.plan = plan
        super().__init__(dit, schedule, **settings)

    def validate(self) -> None:
        super().validate()
        if self.plan is None:
            if self.path is None:
                raise ValueError("the plan cache needs cache.options.path (--cache plan:PATH), the plan file a router "
                                 "was exported to")  # fmt: skip
            self.plan = StaticPlan.load(self.path)
        where = f"cache plan {self.path}" if self.path else "this cache plan"
        if self.plan.depth != self.depth:
            raise ValueError(f"{where} was exported for a {self.plan.depth}-block network; this one has {self.depth}")
        if len(self.plan.table[0]) != self.units:
            raise ValueError(f"{where} has {len(self.plan.table[0])} units per call; this network's trunk has "
                             f"{self.units} (train a router on this network)")  # fmt: skip
        if not same_times(self.plan.times, self.times):
            raise ValueError(f"{where} was trained for {self.plan.describe()}, but this sampling makes "
                             f"{self.num_calls} model calls at other times; sample with {self.plan.describe()} "
                             "or train a router for this sampler and step count")  # fmt: skip
        self.table = self.plan.table.tolist()

    def check_sampling(self, sampler: str, steps: int | None) -> None:
        """Refuse a sampler other than the plan's, even on the same call times (DDPM and DDIM share them)."""
        where = f"cache plan {self.path}" if self.path else "this cache plan"
        check_schedule(asdict(self.plan), sampler, self.plan.steps if steps is None else steps, what=where)

    def compute(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, call: int) -> torch.Tensor:
        tokens, cond = self.dit.embed(x, t, y)
        row = self.table[call]

        def decide(branch: Branch) -> torch.Tensor:
            reused = None if row[branch.unit] else self.recall(branch)
            if reused is not None:
                return reused
            output = branch.compute()
            self.keep(branch, output)
            self.counted(len(output), 1)
            return output

        return self.dit.head(self.through_blocks(tokens, cond, hook=decide), cond)
