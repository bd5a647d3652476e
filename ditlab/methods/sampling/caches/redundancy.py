"""The redundancy probe (Sun et al., "Unveiling Redundancy in Diffusion Transformers (DiTs): A Systematic
Study", arXiv 2411.13588; public code xdit-project/DiTCacheAnalysis).

It samples uncached and records, for every block and every pair of consecutive model calls, how much each
cacheable unit changed: attention keys and values (after the projection), the attention and MLP outputs before
their gates, and the block's whole residual ``h_out - h_in``; both the absolute change ``mean|X_k - X_{k-1}|``
and the relative one (divided by ``mean|X_{k-1}|``, which makes blocks of different scale comparable), per
row, so each CFG branch and each sample is kept apart. The paper's argument that a redundancy profile belongs
to the model rather than to the input is the cross-input coefficient of variation: the mean over (block, step)
of ``std / mean`` of the change across samples. Unlike the public tool (a running mean that drops the first
prompt, and attention only), every sample counts and the MLP and block units are measured too.

On the text-to-image blocks PixArt's cross-attention is a unit of its own (``cross_attention``), and an MM-DiT's keys
and values are those of its joint attention, both streams' projections over ``[text; image]``; samples are conditioned
as every calibration is (``ditlab.models.text.prompts.sample_conditions``: classes, or encoded validation captions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ditlab.methods.sampling.caches.calibration import calibration_conditions
from ditlab.methods.sampling.caches.policy import CachePolicy
from ditlab.models.taps import Branch

UNITS = ("key", "value", "attention", "mlp", "block")
"""The units of a DiT block; PixArt blocks add ``cross_attention`` (:data:`ALL_UNITS`)."""
ALL_UNITS = ("key", "value", "attention", "cross_attention", "mlp", "block")


def step_change(now: torch.Tensor, before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: ``mean|now - before|`` and that divided by ``mean|before|``."""
    dims = tuple(range(1, now.ndim))
    absolute = (now - before).abs().double().mean(dims)
    return absolute, absolute / before.abs().double().mean(dims).clamp_min(1e-12)


def attention_keys_values(attention, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Keys and values an attention component computes from ``inputs``: ditlab's attention (its ``qkv``), or an
    MM-DiT's joint attention (each stream's projection, ``(B, H, L + N, Dh)``); None for other components."""
    if hasattr(attention, "context_heads") and hasattr(attention, "image"):
        length = inputs.shape[1] - attention.num_tokens
        pairs = zip(attention.context_heads(inputs[:, :length]), attention.image.heads(inputs[:, length:]))
        _, key, value = (torch.cat(pair, dim=2) for pair in pairs)
        return key, value
    if hasattr(attention, "qkv"):
        _, key, value = attention.qkv(inputs).chunk(3, dim=-1)
        return key, value
    return None


class RedundancyProbe(CachePolicy):
    """A full-compute model function that records every unit's change from the previous call."""

    name = "probe"

    def start(self) -> None:
        self.previous: dict[tuple[str, int], torch.Tensor] = {}
        self.changes: dict[str, list[dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {unit: [] for unit in ALL_UNITS}

    def record(self, unit: str, block: int, value: torch.Tensor) -> None:
        before = self.previous.get((unit, block))
        if before is not None:
            self.changes[unit][-1][block] = tuple(part.cpu() for part in step_change(value, before))
        self.previous[unit, block] = value

    def probe(self, branch: Branch) -> torch.Tensor:
        inputs = branch.inputs()
        output = branch.fn(inputs)
        self.counted(len(output), 1)
        if branch.kind in ("mlp", "cross_attention"):
            self.record(branch.kind, branch.block, output)
            return output
        keys_values = attention_keys_values(self.dit.blocks[branch.block].attn, inputs)
        if keys_values is not None:  # the projections of ditlab's attention; other components skip K and V
            self.record("key", branch.block, keys_values[0])
            self.record("value", branch.block, keys_values[1])
        self.record("attention", branch.block, output)
        return output

    def compute(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, call: int) -> torch.Tensor:
        if call:
            for unit in ALL_UNITS:
                self.changes[unit].append({})
        tokens, cond = self.dit.embed(x, t, y)
        for index in range(self.depth):
            before = tokens
            tokens = self.through_blocks(tokens, cond, range(index, index + 1), hook=self.probe)
            self.record("block", index, tokens - before)
        return self.dit.head(tokens, cond)

    def tables(self) -> dict[str, dict[str, np.ndarray]]:
        """``unit -> {"absolute", "relative"} -> (calls - 1, depth, rows)`` arrays (units never seen are left out)."""
        result = {}
        for unit, calls in self.changes.items():
            if not calls or not calls[0]:
                continue
            result[unit] = {measure: np.stack([np.stack([calls[k][block][i].numpy() for block in range(self.depth)])
                                               for k in range(len(calls))])
                            for i, measure in enumerate(("absolute", "relative"))}  # fmt: skip
        return result


def coefficient_of_variation(changes: np.ndarray) -> float:
    """Mean over (step, block) of ``std / mean`` across samples of ``changes: (steps, blocks, samples)``.

    0 when every sample changes alike: the profile is then a property of the model, not of the input.
    """
    mean = changes.mean(-1)
    return float(np.mean(changes.std(-1) / np.maximum(mean, 1e-300)))


def summarise(tables: dict[str, dict[str, np.ndarray]], branches: list[str]) -> dict:
    """Per unit, CFG branch and measure: the ``(blocks, steps)`` mean over samples and the cross-sample CoV.

    Rows are ``[branch 0 samples; branch 1 samples; ...]``, as the sampler batches guidance.
    """
    summary: dict = {}
    for unit, measures in tables.items():
        summary[unit] = {}
        for b, branch in enumerate(branches):
            summary[unit][branch] = {}
            for measure, changes in measures.items():
                rows = np.split(changes, len(branches), axis=-1)[b]
                summary[unit][branch][measure] = {"mean": rows.mean(-1).T.tolist(),
                                                  "cov": coefficient_of_variation(rows)}  # fmt: skip
    return summary


@torch.no_grad()
def redundancy_profile(dit, objective, sampler: str | None, steps: int, cfg_scale: float = 1.0,
                       num_samples: int = 8, seed: int = 0) -> dict:  # fmt: skip
    """Sample ``num_samples`` images (``sample_conditions``: classes ``0, 1, ...`` or validation captions, seeds
    ``seed + i``) uncached, recording every unit.

    Returns ``{"sampler", "steps", "cfg_scale", "num_samples", "times", "branches", "units": summarise(...)}``;
    ``times`` are the network times of the calls, so column ``k`` of a table is the change from call ``k`` to
    ``k + 1``.
    """
    from ditlab.diffusion.sample import model_call_times, sample_images

    if num_samples < 2:
        raise ValueError(f"the redundancy probe needs at least 2 samples for its cross-sample CoV (got {num_samples})")
    sampler = sampler or objective.default_sampler
    schedule = model_call_times(objective, sampler, steps)
    if schedule is None:
        raise ValueError(f"the redundancy probe compares consecutive model calls of a fixed schedule; {sampler} is "
                         "adaptive, so use a fixed-step sampler")  # fmt: skip
    if len(schedule) < 2:
        raise ValueError(f"the redundancy probe needs at least 2 model calls; {sampler} at {steps} steps makes one")
    probe = RedundancyProbe(dit, schedule)
    labels = calibration_conditions(dit, num_samples)
    was_training = dit.training
    dit.eval()
    sample_images(probe, objective, labels, seed=seed, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                  batch_size=num_samples)  # fmt: skip
    dit.train(was_training)
    branches = ["cond", "uncond"] if cfg_scale != 1.0 else ["cond"]
    return {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale, "num_samples": num_samples,
            "depth": dit.depth, "times": probe.times, "branches": branches,
            "units": summarise(probe.tables(), branches)}  # fmt: skip


def plot_redundancy(profile: dict, path: str | Path, measure: str = "relative") -> Path:
    """Heatmaps of the mean step-to-step change, block x step, one panel per unit (rows: CFG branches)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    units, branches = list(profile["units"]), profile["branches"]
    values = [np.asarray(profile["units"][u][b][measure]["mean"]) for u in units for b in branches]
    positive = np.concatenate([v[v > 0].ravel() for v in values]) if values else np.ones(1)
    norm = LogNorm(vmin=max(positive.min(), 1e-6), vmax=positive.max())
    figure, axes = plt.subplots(len(branches), len(units), figsize=(3.1 * len(units), 2.9 * len(branches)),
                                squeeze=False, sharex=True, sharey=True)  # fmt: skip
    for row, branch in enumerate(branches):
        for column, unit in enumerate(units):
            axis = axes[row][column]
            table = np.asarray(profile["units"][unit][branch][measure]["mean"])
            image = axis.imshow(np.maximum(table, norm.vmin), aspect="auto", origin="lower", norm=norm, cmap="magma")
            cov = profile["units"][unit][branch][measure]["cov"]
            axis.set_title(f"{unit} ({branch})  CoV {cov:.2f}", fontsize=9)
            if column == 0:
                axis.set_ylabel("block")
            if row == len(branches) - 1:
                axis.set_xlabel("step (noise -> data)")
    figure.colorbar(image, ax=axes, shrink=0.8, label=f"{measure} change from the previous step")
    figure.suptitle(f"Step-to-step change per block: {profile['sampler']}, {profile['steps']} steps, "
                    f"cfg {profile['cfg_scale']}, {profile['num_samples']} samples", fontsize=10)  # fmt: skip
    path = Path(path)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
