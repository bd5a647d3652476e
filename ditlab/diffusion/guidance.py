"""Classifier-free guidance (Ho & Salimans, 2022) for any model function ``(x, t, y) -> output``.

The conditional and unconditional rows run as one batch ``[cond; uncond]`` (as the public DiT does), so a
stateful model function (a feature cache) sees each CFG branch in its own rows and never mixes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

ModelFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EMPTY_CAPTION = "empty caption"
"""The null condition of text-conditioned model functions: each row's ``TextFeatures.null`` (the encoder's ``""``)."""


def guidance_rows(x: torch.Tensor, t: torch.Tensor, y, null_label: int | str) -> tuple[torch.Tensor, torch.Tensor, object]:
    """The ``[cond; uncond]`` inputs of one guided model call: every row twice, the second copy on the null class
    (labels) or the empty caption (``TextFeatures``, with ``null_label`` :data:`EMPTY_CAPTION`)."""
    if null_label == EMPTY_CAPTION:
        if not hasattr(y, "null_rows"):
            raise ValueError("guidance with the empty caption needs text features as the condition, got labels")
        uncond = type(y).cat([y, y.null_rows()])
    else:
        uncond = torch.cat([y, torch.full_like(y, null_label)])
    return torch.cat([x, x]), torch.cat([t, t]) if t.ndim else t, uncond


def combine(both: torch.Tensor, channels: int, cfg_scale: float, cfg_channels: int | None = None) -> torch.Tensor:
    """``uncond + w (cond - uncond)`` of a ``[cond; uncond]`` output on its first ``cfg_channels`` channels
    (default: the ``channels`` of the input; ``3`` reproduces the public DiT), the conditional rows on the rest."""
    mixed = cfg_channels or channels
    guided, rest = both[:, :mixed], both[:, mixed:]
    cond, uncond = guided.chunk(2)
    return torch.cat([uncond + cfg_scale * (cond - uncond), rest.chunk(2)[0]], dim=1)


def guided_output(model: ModelFunction, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, null_label: int,
                  cfg_scale: float, cfg_channels: int | None = None) -> torch.Tensor:  # fmt: skip
    """The guided output of ``model`` (:func:`combine` of one call on :func:`guidance_rows`)."""
    return combine(model(*guidance_rows(x, t, y, null_label)), x.shape[1], cfg_scale, cfg_channels)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance settings, applied only for noise levels inside ``interval`` when one is given.

    ``interval`` ``(low, high)`` is in the objective's noise level (0 data, 1 noise; the flow time ``t`` itself,
    the DDPM step over ``T``), closed at both ends: REPA's ``guidance_high=0.7`` is ``(0.0, 0.7)`` (Kynkaanniemi
    et al., "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality", 2024). Outside it
    the model function is called once on the conditional rows only (``B`` rows instead of ``[cond; uncond]``), as
    REPA does, so a stateful model function must accept both batch layouts within one trajectory.
    """

    scale: float = 1.0
    channels: int | None = None
    null_label: int | str | None = None
    interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        check_guidance_interval(self.interval)
        if self.scale != 1.0 and self.null_label is None:
            raise ValueError("guidance (cfg_scale != 1) needs the null class: pass null_label= for this model function")

    def applies(self, level: float) -> bool:
        """Whether a model call at noise level ``level`` is guided."""
        if self.scale == 1.0:
            return False
        return self.interval is None or self.interval[0] <= level <= self.interval[1]

    def __call__(self, model: ModelFunction, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                 level: float) -> torch.Tensor:  # fmt: skip
        """The (guided, when it ``applies`` at ``level``) output of ``model`` at network time ``t``."""
        if not self.applies(level):
            return model(x, t, y)
        return guided_output(model, x, t, y, self.null_label, self.scale, self.channels)


def check_guidance_interval(interval: Sequence[float] | None) -> None:
    """One-line error unless ``interval`` is None or ``(low, high)`` with ``0 <= low <= high <= 1``."""
    if interval is None:
        return
    values = list(interval)
    if len(values) != 2 or not 0 <= values[0] <= values[1] <= 1:
        raise ValueError(f"guidance_interval {values} must be [low, high] with 0 <= low <= high <= 1 "
                         "(noise levels: 0 data, 1 noise)")  # fmt: skip
