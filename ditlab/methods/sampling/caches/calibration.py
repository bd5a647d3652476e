"""What the input-driven caches learn from one uncached run of the sampler they will serve.

TeaCache rescales the relative change of block 0's modulated input into an estimate of the relative change of
the network output with a polynomial fitted on the model itself (``np.polyfit(rel_in, rel_out, 4)``, as the
TeaCache maintainers describe); MagCache needs the ratio of the whole-stack residual's magnitude between
consecutive calls, which its authors find to be a property of the model and schedule, stable across inputs.
Both come from one run of :class:`Recorder`, a full-compute model function, on a few seeded samples, conditioned as
every calibration and report is (``ditlab.models.text.prompts.sample_conditions``: classes ``0, 1, ...``, or the
digit scenes' validation captions encoded by a text-conditioned network's own text encoder).

On a network whose blocks carry the text stream (MM-DiT, FLUX: ``DiT.text_stream``, tokens ``[text; image]``) both
read the image stream, as TeaCache4FLUX and MagCache4FLUX do: the indicator is the image rows of the first block's
modulated attention input (FLUX's ``transformer_blocks[0].norm1(img, temb)``; the text rows move with ``t`` only),
and the magnitude ratio is that of the image rows of the residual (MagCache4FLUX's ``hidden_states -
ori_hidden_states`` after the single-stream blocks drop the text). The residual the policies store and add back
covers both streams, so a reused call moves text and image tokens by the same computed call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ditlab.methods.sampling.caches.none import NoCache

CALIBRATION_SEED = 1_000_003
"""Noise seed base of calibration samples: far from the seeds that samples and metrics use."""


def relative_l1(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """``mean|now - before| / mean|before|`` per row (the change measure TeaCache uses)."""
    dims = tuple(range(1, now.ndim))
    return (now - before).abs().mean(dims) / before.abs().mean(dims).clamp_min(1e-12)


class _Captured(Exception):
    """Ends a block's forward once its first branch input is read."""


def image_rows(dit, tokens: torch.Tensor) -> torch.Tensor:
    """The image tokens of ``tokens (B, S, D)``: the last ``N`` of a text-stream network's ``[text; image]``, else all."""
    return tokens[:, -dit.x_embedder.num_patches :] if getattr(dit, "text_stream", False) else tokens


def block0_modulated_input(dit, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The first block's first branch input (a DiT block's ``LN(h0) (1 + scale) + shift``; PixArt's under its
    adaLN-single table; an MM-DiT's image stream ``LN(x) (1 + scale_x) + shift_x``, the image rows of its joint
    attention input): cheap, and it moves with ``t``. Read through the block protocol's branch hook, so any block
    kind gives its own; on a text-stream network only its image rows (see the module notes)."""
    captured = []

    def first(branch):
        captured.append(branch.inputs())
        raise _Captured

    try:
        dit.blocks[0](tokens, cond, branches=first, index=0)
    except _Captured:
        return image_rows(dit, captured[0])
    raise ValueError(f"block {type(dit.blocks[0]).__name__} offers no branch to a hook; TeaCache cannot read its input")


@dataclass
class Calibration:
    """Per model call and row: input change, output change and residual magnitude ratio (call 0 has none)."""

    input_change: list[torch.Tensor] = field(default_factory=list)
    output_change: list[torch.Tensor] = field(default_factory=list)
    magnitude_ratio: list[torch.Tensor] = field(default_factory=list)

    def decision_points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input change, output change)`` of the calls TeaCache decides on: all but the first (no change yet)
        and the last (always computed). The last one matters: at 50 DDIM steps its output changes by ~100%
        against ~1% elsewhere, and one such outlier bends a quartic fit negative over the common range."""
        inputs, outputs = self.input_change[:-1], self.output_change[:-1]
        if not inputs:
            raise ValueError("fitting TeaCache's polynomial needs a schedule of at least 3 model calls")
        return torch.cat(inputs).double(), torch.cat(outputs).double()

    def coefficients(self, degree: int = 4) -> list[float]:
        """TeaCache's rescaling polynomial (highest power first), fitted on every (call, row) it decides on."""
        x, y = (values.numpy() for values in self.decision_points())
        if len(x) <= degree:
            raise ValueError(f"fitting a degree-{degree} polynomial needs more than {degree} calibration points; "
                             "calibrate on more samples or steps")  # fmt: skip
        return [float(c) for c in np.polyfit(x, y, degree)]

    def input_range(self) -> tuple[float, float]:
        """The input changes the polynomial was fitted on: outside them a quartic is no estimate."""
        x, _ = self.decision_points()
        return float(x.min()), float(x.max())

    def magnitudes(self) -> list[float]:
        """MagCache's ratio for every call (1 at call 0), averaged over the calibration rows."""
        return [1.0] + [float(ratio.mean()) for ratio in self.magnitude_ratio]


class Recorder(NoCache):
    """Computes everything, recording what :class:`Calibration` needs at every call."""

    name = "recorder"

    def start(self) -> None:
        self.calibration = getattr(self, "calibration", None) or Calibration()
        self.previous: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def compute(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, call: int) -> torch.Tensor:
        tokens, cond = self.dit.embed(x, t, y)
        indicator = block0_modulated_input(self.dit, tokens, cond)
        out_tokens = self.through_blocks(tokens, cond)
        output = self.dit.head(out_tokens, cond)
        residual_norm = image_rows(self.dit, out_tokens - tokens).float().norm(dim=-1)
        if self.previous is not None:
            before_indicator, before_output, before_norm = self.previous
            self.calibration.input_change.append(relative_l1(indicator, before_indicator).float().cpu())
            self.calibration.output_change.append(relative_l1(output, before_output).float().cpu())
            self.calibration.magnitude_ratio.append((residual_norm / before_norm.clamp_min(1e-8)).mean(1).cpu())
        self.previous = (indicator, output, residual_norm)
        return output


def calibration_conditions(dit, count: int):
    """The conditions of ``count`` calibration samples as ``dit`` takes them: class labels ``0, 1, ...``, or the
    validation captions encoded by the network's text encoder (one line when a text-conditioned network names none:
    give the policy its fitted values instead, e.g. ``coefficients`` / ``magnitudes``)."""
    from ditlab.metrics.text_eval import sample_conditions
    from ditlab.models.text.prompts import condition_input

    config = dit.config
    try:
        return condition_input(config, sample_conditions(config, count))
    except ValueError as error:
        if not getattr(config, "text_conditioned", False):
            raise
        raise ValueError(f"calibrating a cache on this text-conditioned network encodes validation captions: "
                         f"{error}") from None


def calibrate(dit, objective, schedule: torch.Tensor, num_samples: int = 1, seed: int = CALIBRATION_SEED,
              **sampling) -> Calibration:  # fmt: skip
    """Record one uncached run of ``num_samples`` seeded samples (``sample_conditions``: classes ``0, 1, ...`` or
    validation captions) with the ``sampling`` options (``sampler``, ``steps``, ``cfg_scale``, ...) whose model calls
    ``schedule`` lists."""
    from ditlab.diffusion.sample import sample_images

    recorder = Recorder(dit, schedule)
    recorder.calibration = Calibration()
    labels = calibration_conditions(dit, num_samples)
    was_training = dit.training
    dit.eval()
    sample_images(recorder, objective, labels, seed=seed, batch_size=num_samples, **sampling)
    dit.train(was_training)
    return recorder.calibration
