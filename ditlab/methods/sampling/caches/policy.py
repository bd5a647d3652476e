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
from typing import Any, ClassVar

import torch

from ditlab.diffusion.config import CACHE_CHECKS
from ditlab.models.dit import DiT
from ditlab.models.taps import Branch, check_block_loop, run_block_range

KNOB_RANGES: dict[str, tuple[type, float, float | None]] = {
    "interval": (int, 1, None),
    "threshold": (float, 0.0, None),
    "blocks": (int, 0, None),
    "boundary": (float, 0.0, 1.0),
    "order": (int, 0, 4),
    "max_skip": (int, 1, None),
    "warmup": (int, 0, None),
    "ratio": (float, 0.0, 1.0),
}
"""Each scalar knob's type and closed range (None: unbounded); the schedule-dependent bounds are checked at build."""

POLICIES: dict[str, type[CachePolicy]] = {}


def register_policy(cls: type[CachePolicy]) -> type[CachePolicy]:
    """Class decorator: make a policy selectable by its ``name`` (``--cache NAME``, ``sampling.cache.policy``)."""
    POLICIES[cls.name] = cls
    CACHE_CHECKS[cls.name] = check_cache_config  # CacheConfig checks its knobs when it is made
    return cls


def policy_class(name: str) -> type[CachePolicy]:
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r} (cache.policy / --cache); choices: {sorted(POLICIES)}")
    return POLICIES[name]


def policy_settings(config) -> dict[str, Any]:
    """The knobs ``config.policy`` reads, its defaults filled in and every value range-checked.

    A knob the policy does not read is refused rather than ignored: a sweep that sets ``threshold`` on ``fora``
    would otherwise silently measure the default.
    """
    cls = policy_class(config.policy)
    stray = [name for name in (*KNOB_RANGES, "coefficients", "magnitudes")
             if getattr(config, name) is not None and name not in cls.defaults]  # fmt: skip
    if stray:
        knobs = ", ".join(cls.defaults) or "none"
        raise ValueError(f"cache.{stray[0]} is not a knob of the {cls.name} policy (its knobs: {knobs})")
    settings = {name: getattr(config, name) if getattr(config, name) is not None else default
                for name, default in cls.defaults.items()}  # fmt: skip
    for name, value in settings.items():
        if name not in KNOB_RANGES or value is None:
            continue
        kind, low, high = KNOB_RANGES[name]
        if kind is int and (isinstance(value, bool) or int(value) != value):
            raise ValueError(f"cache.{name}={value} must be a whole number for the {cls.name} policy")
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"cache.{name}={value} is out of range for the {cls.name} policy; it must be {bounds}")
        settings[name] = kind(value)
    return settings


def check_cache_config(config) -> None:
    """Validate a ``CacheConfig`` when it is made (policy name, stray knobs, knob ranges)."""
    policy_settings(config)


class CachePolicy:
    """Base class: call bookkeeping, knob checks against the network and schedule, and work counters.

    Subclasses set ``name`` and ``defaults`` (their knobs), implement :meth:`start` (clear the per-trajectory
    state) and :meth:`compute` (one model call), and may override :meth:`validate` for schedule-dependent checks.
    ``work`` counts branch evaluations actually run, in units of one (row, block, attention-or-MLP) branch, next
    to what the plain network would have run; FLOPs are measured separately (``ditlab.methods.sampling.caches.work``).
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    repeated_times: ClassVar[bool] = True
    """False where the policy cannot serve a sampler that calls the network twice at one time (Heun)."""

    def __init__(self, dit: DiT, schedule: torch.Tensor, **settings: Any) -> None:
        check_block_loop(dit)
        self.dit = dit
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
        raise ValueError(f"cache.{knob}={value} does not fit: the {self.name} policy needs {requirement}")

    def reset(self) -> None:
        """Forget everything cached: called by the sampler at the start of every trajectory."""
        self.call, self.rows = 0, None
        self.work = {"computed": 0.0, "full": 0.0}
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
            self.start()  # guidance switched on or off: no cached row fits the new layout, so compute in full
        self.rows = len(x)
        self.work["full"] += 2 * self.depth * len(x)
        output = self.compute(x, t, y, self.call)
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
                     hook: Callable[[Branch], torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        """``tokens`` through ``blocks`` (default all), counted; ``hook`` decides branches (counted by it)."""
        blocks = range(self.depth) if blocks is None else blocks
        if hook is None:
            self.counted(len(tokens), 2 * len(blocks))
        return run_block_range(self.dit, tokens, cond, blocks, hook)
