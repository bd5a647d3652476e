"""The cache-policy interface: a stateful model function ``(x, t, y) -> output`` over the DiT's block loop.

Training-free feature caches (FORA, Delta-DiT, TeaCache, TaylorSeer, MagCache, ToCa) all answer one question
per model call: which units of the network (the whole block stack, a block range, each block's attention / MLP
branch before its gate, single tokens) are computed and which are reused or forecast from earlier calls. A
policy is a model function the sampler calls like the network (``ditlab.diffusion.sample``), so it sees every
model call of one trajectory in order and is ``reset()`` at the start of each one. It computes through
``ditlab.models.taps`` (``embed`` / :func:`run_block_range` / ``head``), never by patching the network, and
the gates are always recomputed from the current condition.

Guidance runs as one batch ``[cond; uncond]``, and every cached tensor here is kept per row, so the two CFG
branches never share an entry; a policy that decides per call does so from the call index alone (the same for
every row), and one that decides from the input (TeaCache) decides per row. Either way a batch samples what its
rows sampled one by one.

A policy is planned for one sampler schedule (``ditlab.diffusion.sample.model_call_times``): it knows how many
model calls a trajectory makes and the network time of each, which fixes forced first/last calls, stage
boundaries and forecasting distances, and lets a knob that does not fit the schedule be refused before sampling.
An adaptive solver, whose calls are not known ahead, cannot be served. When guidance is limited to an interval
the sampler switches between ``[cond; uncond]`` and conditional-only calls; a policy then drops what it cached
(no row layout fits both) and computes that call in full.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any, ClassVar

import torch

from ditlab.diffusion.cache import NoOptions, register_cache_policy
from ditlab.models.dit import DiT
from ditlab.models.taps import Branch, run_block_range


def register_policy(cls: type[CachePolicy]) -> type[CachePolicy]:
    """Class decorator: make a policy selectable by its ``name`` (``--cache NAME``, ``sampling.cache.policy``) with
    its ``Options`` dataclass (its knobs, their defaults and ranges), planned by ``build.planned_policy``."""
    cls.defaults = {item.name: item.default for item in fields(cls.Options)}

    def factory(network: DiT, objective, options, **sampling: Any) -> CachePolicy:
        from ditlab.methods.sampling.caches.build import planned_policy

        return planned_policy(cls, network, objective, options, **sampling)

    register_cache_policy(cls.name, cls.Options, factory)
    return cls


class CachePolicy:
    """Base class: call bookkeeping, knob checks against the network and schedule, and work counters.

    Subclasses set ``name`` and ``Options`` (their knobs' dataclass, from which ``defaults`` is filled), implement
    :meth:`start` (clear the per-trajectory state) and :meth:`compute` (one model call), and may override
    :meth:`validate` for schedule-dependent checks.
    ``work`` counts branch evaluations actually run, in units of one (row, block, attention-or-MLP) branch, next
    to what the plain network would have run; FLOPs are measured separately (``ditlab.methods.sampling.caches.work``).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    defaults: ClassVar[dict[str, Any]] = {}
    repeated_times: ClassVar[bool] = True
    """False where the policy cannot serve a sampler that calls the network twice at one time (Heun)."""

    routed_trunks: ClassVar[bool] = False
    """True where the policy follows a trunk that runs blocks on some images only (Mixture of Blocks): its hook
    reads ``branch.rows`` (through :meth:`keep` / :meth:`recall`) or it never hooks branches."""

    def __init__(self, dit: DiT, schedule: torch.Tensor, **settings: Any) -> None:
        if not dit.trunk.block_loop:
            dit.trunk.require("branch_hooks", f"the {self.name} cache", dit.config.trunk)
            if not self.routed_trunks:
                raise ValueError(f"the {self.name} cache keeps per-block state for every image, which the "
                                 f"{dit.config.trunk!r} trunk (blocks run on some images only) does not give it; "
                                 "use fora, teacache, magcache or plan on this network")  # fmt: skip
        self.dit = dit
        self.units = len(dit.units())
        self.config = dit.config  # what the sampler asks (sample shape, guidance null class)
        self.schedule = torch.as_tensor(schedule, dtype=torch.float64).flatten().cpu()
        self.times = self.schedule.tolist()
        unknown = set(settings) - set(self.defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown settings {sorted(unknown)}")
        for name, default in self.defaults.items():
            setattr(self, name, settings.get(name, default))
        if len(self.times) < 1:
            raise ValueError("a cache policy needs a schedule of at least one model call")
        self.validate()
        self.reset()

    @property
    def num_calls(self) -> int:
        """Model calls in one trajectory of the schedule the policy was planned for."""
        return len(self.times)

    @property
    def depth(self) -> int:
        return self.dit.depth

    def parameters(self):
        """The network's parameters (the sampler reads the device from them)."""
        return self.dit.parameters()

    def validate(self) -> None:
        """Refuse knobs that do not fit this network or schedule (one-line ``ValueError``)."""
        if not self.repeated_times and len(set(self.times)) < len(self.times):
            raise ValueError(f"the {self.name} cache needs a different network time at every model call, but this "
                             "sampler evaluates the network twice at the same time (heun); use euler, ddim or dpm++")  # fmt: skip
        warmup = getattr(self, "warmup", None)
        if warmup is not None and warmup > self.num_calls:
            self.refuse("warmup", warmup, f"at most the {self.num_calls} model calls of one trajectory")
        interval = getattr(self, "interval", None)
        if interval is not None and interval > self.num_calls:
            self.refuse("interval", interval, f"at most the {self.num_calls} model calls of one trajectory")

    def refuse(self, knob: str, value: Any, requirement: str) -> None:
        raise ValueError(f"cache.options.{knob}={value} does not fit: the {self.name} policy needs {requirement}")

    def reset(self) -> None:
        """Forget everything cached: called by the sampler at the start of every trajectory."""
        self.call, self.rows, self.t = 0, None, None
        self.work = {"computed": 0.0, "full": 0.0, "offered": 0.0}
        self.full_per_row = float(self.units)
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.dit.reset()
        self.start()

    def start(self) -> None:
        """Clear the per-trajectory state (subclasses)."""

    def compute(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, call: int) -> torch.Tensor:
        """The network output for model call number ``call`` of the trajectory (subclasses)."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.call >= self.num_calls:
            raise ValueError(f"the {self.name} cache was planned for {self.num_calls} model calls per trajectory and "
                             "got another; sample with the steps and sampler it was built for (reset() starts over)")  # fmt: skip
        if self.rows is not None and len(x) != self.rows:
            self.kept = {}  # guidance switched on or off: no cached row fits the new layout, so compute in full
            self.start()
        self.rows, self.t = len(x), t
        offered = self.work["offered"]
        output = self.compute(x, t, y, self.call)
        if not self.dit.trunk.block_loop and self.work["offered"] > offered:  # a routed trunk: what it ran
            self.full_per_row = (self.work["offered"] - offered) / len(x)
        self.work["full"] += self.full_per_row * len(x)
        self.call += 1
        return output

    def counted(self, rows: int, branches: float) -> None:
        """Record ``branches`` branch evaluations on each of ``rows`` rows."""
        self.work["computed"] += rows * branches

    @property
    def computed_share(self) -> float:
        """Share of the plain network's branch evaluations this trajectory actually ran."""
        return self.work["computed"] / self.work["full"] if self.work["full"] else 1.0

    def through_blocks(self, tokens: torch.Tensor, cond: torch.Tensor, blocks: range | None = None,
                       hook: Callable[[Branch], torch.Tensor] | None = None,
                       t: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``tokens`` through ``blocks`` (default: the whole trunk, however it routes), counted; ``hook`` decides
        branches and counts what it computes (:meth:`counted`). A block range needs a plain-loop trunk. ``t`` is the
        network time of these rows (default: the call's, for all its rows)."""
        def count(branch: Branch) -> torch.Tensor:
            rows = len(branch.rows) if branch.rows is not None else len(tokens)
            self.work["offered"] += rows
            if hook is None:
                self.counted(rows, 1)
                return branch.compute()
            return hook(branch)

        if blocks is None:
            return self.dit.run_trunk(tokens, cond, self.t if t is None else t, branches=count)
        return run_block_range(self.dit, tokens, cond, blocks, count)

    def keep(self, branch: Branch, output: torch.Tensor) -> None:
        """Store ``output`` as the cached value of ``branch``'s unit, for the rows it was computed on."""
        if branch.rows is None:
            self.kept[branch.unit] = (output, None)
            return
        stored, valid = self.kept.get(branch.unit, (None, None))
        if stored is None:
            stored = output.new_zeros((self.rows, *output.shape[1:]))
            valid = torch.zeros(self.rows, dtype=torch.bool, device=output.device)
        else:
            valid = torch.ones(self.rows, dtype=torch.bool, device=output.device) if valid is None else valid.clone()
        valid[branch.rows] = True
        self.kept[branch.unit] = (stored.index_copy(0, branch.rows, output), valid)

    def recall(self, branch: Branch) -> torch.Tensor | None:
        """The cached value of ``branch``'s unit for its rows; None when some of them were never computed."""
        stored, valid = self.kept.get(branch.unit, (None, None))
        if stored is None:
            return None
        if branch.rows is None:
            return stored if valid is None or bool(valid.all()) else None
        return stored[branch.rows] if valid is None or bool(valid[branch.rows].all()) else None
