"""Judging finished runs: the plain functions behind ``notebooks/evaluate.ipynb``.

A run is a log directory ``runs/<name>/version_<n>/`` holding ``summary.json``, ``checkpoints/final.ckpt``
and TensorBoard events. These functions load runs, sample their EMA networks with fixed seeds and labels
(so two runs can be compared on the same noise), score samples with :func:`ditlab.metrics.fid.evaluate_images`
and lay numbers out as rows (``list[dict]``) that :func:`markdown_table` renders; the notebook only plots.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ditlab.checkpoint import Bundle, bundle_from_checkpoint, sample_bundle, sampling_model  # noqa: F401 (the notebook's names)


@dataclass
class Run:
    """One finished ``fit``: its directory, ``summary.json`` and final checkpoint (None when absent)."""

    path: Path
    summary: dict
    checkpoint: Path | None
    name: str = ""
    _bundle: Bundle | None = field(default=None, repr=False)

    @property
    def bundle(self) -> Bundle:
        """Network, objective and sampling settings of the checkpoint, loaded once."""
        if self._bundle is None:
            if self.checkpoint is None:
                raise FileNotFoundError(f"run {self.path} has no checkpoints/final.ckpt; did its fit finish?")
            self._bundle = bundle_from_checkpoint(self.checkpoint)
        return self._bundle


def find_runs(root: str | Path = "runs", newest: int = 2) -> list[Path]:
    """The ``newest`` run directories under ``root`` that hold a ``summary.json``, newest first."""
    summaries = sorted(Path(root).glob("**/summary.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [path.parent for path in summaries[:newest]]


def load_run(path: str | Path) -> Run:
    """A run from its log directory (or from the path of its ``summary.json``)."""
    path = Path(path)
    path = path.parent if path.name == "summary.json" else path
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(
            f"{summary_path} does not exist; pass a log directory runs/<name>/version_<n>"
        )
    checkpoint = path / "checkpoints" / "final.ckpt"
    name = f"{path.parent.name}/{path.name}" if path.name.startswith("version_") else path.name
    return Run(path, json.loads(summary_path.read_text()), checkpoint if checkpoint.is_file() else None, name)


# ----------------------------------------------------------------------------------- sampling
def sample_run(run: Run, labels: torch.Tensor, seed: int = 0, progress: str | None = None,
               **overrides) -> torch.Tensor:  # fmt: skip
    """Images in [-1, 1], ``(N, C, H, W)``, from the run's EMA network; sample ``i`` uses noise seed ``seed + i``.

    ``overrides`` replace the checkpoint's sampling settings (``steps``, ``sampler``, ``cfg_scale``, ``cache``,
    ``time_grid``, ...); ``progress`` names a progress bar (None: silent).
    """
    return sample_bundle(run.bundle, labels, replace(run.bundle.sampling, **overrides), seed, progress)


def class_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """``(num_classes * per_class,)``: ``per_class`` copies of each class in order (one grid row per class)."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def image_grid(images: torch.Tensor, per_row: int, min_size: int = 48) -> torch.Tensor:
    """``(H', W', C)`` array in [0, 1] for ``plt.imshow``; small images are upscaled (nearest) to be readable."""
    from torchvision.utils import make_grid

    if images.shape[-1] < min_size:
        images = F.interpolate(images, scale_factor=max(1, min_size // images.shape[-1]), mode="nearest")
    grid = make_grid((images + 1) / 2, nrow=per_row, padding=2, pad_value=1.0)
    return grid.permute(1, 2, 0).clamp(0, 1)


def class_grid(
    run: Run, per_class: int = 8, seed: int = 0, classes: int | None = None, **overrides
) -> torch.Tensor:
    """Sample grid of one run, one row per class (the first ``classes`` classes; all up to 10 by default)."""
    num_classes = classes or min(run.bundle.network.num_classes, 10)
    images = sample_run(run, class_labels(num_classes, per_class), seed=seed, **overrides)
    return image_grid(images, per_class)


def side_by_side(runs: list[Run], labels: torch.Tensor, seed: int = 0, **overrides) -> torch.Tensor:
    """One row per run, the same noise seeds and labels in every row: differences are the networks' alone."""
    rows = [sample_run(run, labels, seed=seed, **overrides) for run in runs]
    return image_grid(torch.cat(rows), len(labels))


# ----------------------------------------------------------------------------------- tables
def metrics_table(
    runs: list[Run], keys: tuple[str, ...] = ("val/loss", "train/loss", "eval/fid")
) -> list[dict]:
    """One row per network: each run, plus ``teacher``/``student`` rows for compression runs."""
    rows = []
    for run in runs:
        summary = run.summary
        metrics = summary.get("metrics", {})
        row = {"run": run.name, "steps": summary.get("steps"), "parameters": summary.get("parameters")}
        row.update({key: metrics.get(key) for key in keys})
        row["train_images_per_s"] = summary.get("train_images_per_s")
        rows.append(row)
        for role in ("teacher", "student"):
            if role in summary:
                entry = summary[role]
                rows.append({"run": f"{run.name} [{role}]", "steps": None, "parameters": entry.get("parameters"),
                             "blocks": entry.get("blocks"), "flops_per_image": entry.get("flops_per_image"),
                             "sampling_images_per_s": entry.get("sampling_images_per_s"),
                             "eval/fid": entry.get("fid"), "fid_features": entry.get("fid_features")})  # fmt: skip
    return rows


def scalar_series(log_dir: str | Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of a TensorBoard scalar in a log directory's events (empty when it was never logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    if tag not in events.Tags().get("scalars", []):
        return []
    return [(event.step, event.value) for event in events.Scalars(tag)]


def fid_vs_step(run: Run, tag: str = "eval/fid") -> list[tuple[int, float]]:
    """``(step, value)`` of a TensorBoard scalar in the run's events (empty when it was never logged)."""
    return scalar_series(run.path, tag)


def first_reach(curve: list[tuple[int, float]] | list[list[float]], level: float) -> float | None:
    """The first step at which a quality-vs-step curve (lower is better, e.g. FID) is at or below ``level``, linear
    between evaluations; None if it never gets there. How "steps to the baseline's quality" is read off a curve."""
    previous = None
    for step, value in curve:
        if value <= level:
            if previous is None or previous[1] <= level:
                return float(step)
            s0, v0 = previous
            return s0 + (v0 - level) / (v0 - value) * (step - s0)
        previous = (step, value)
    return None


def function_evaluations(steps: int, sampler: str | None, cfg_scale: float) -> int:
    """Network calls per image: Heun takes two per step but the last; guidance doubles the batch, not the calls."""
    return 2 * steps - 1 if sampler == "heun" else steps


def fid_vs_nfe(run: Run, steps: tuple[int, ...] = (5, 10, 25), num_samples: int = 100, seed: int = 0,
               reference: str = "digits", features: str = "digits-classifier", **overrides) -> list[dict]:  # fmt: skip
    """FID of the same checkpoint, labels and seeds at several step counts (class-balanced labels)."""
    labels = torch.arange(num_samples) % run.bundle.network.num_classes
    rows = []
    for count in steps:
        from ditlab.metrics.fid import evaluate_images

        start = time.perf_counter()
        images = sample_run(run, labels, seed=seed, steps=count, **overrides)
        seconds = time.perf_counter() - start
        metrics = evaluate_images(images, reference=reference, features=features)
        sampler = overrides.get("sampler", run.bundle.sampling.sampler)
        cfg = overrides.get("cfg_scale", run.bundle.sampling.cfg_scale)
        rows.append({"run": run.name, "steps": count, "nfe": function_evaluations(count, sampler, cfg),
                     "fid": metrics["fid"], "fid_features": metrics["fid_features"], "num_samples": num_samples,
                     "images_per_s": num_samples / seconds})  # fmt: skip
    return rows


def parameter_count(run: Run) -> int:
    """Parameters of the run's sampled (EMA) network."""
    return sum(p.numel() for p in run.bundle.network.parameters())


@torch.no_grad()
def latency_table(runs: list[Run], batch: int = 16, steps: int | None = None, repeats: int = 1,
                  fid: dict[str, float] | None = None) -> list[dict]:  # fmt: skip
    """Parameters, sampling latency per batch and per image on this machine, and quality, one row per run.

    Latency is the best of ``repeats`` timed batches after one warm-up batch; FID comes from ``fid``
    (run name -> value, e.g. from :func:`fid_vs_nfe`) or else from the run's summary.
    """
    rows = []
    for run in runs:
        overrides = {"steps": steps} if steps else {}
        labels = torch.arange(batch) % run.bundle.network.num_classes
        sample_run(run, labels[:2], **overrides)  # warm-up: scheduler construction, allocator
        timings = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            sample_run(run, labels, **overrides)
            timings.append(time.perf_counter() - start)
        seconds = min(timings)
        quality = (fid or {}).get(run.name, run.summary.get("metrics", {}).get("eval/fid"))
        rows.append({"run": run.name, "parameters": parameter_count(run), "blocks": run.bundle.network.depth,
                     "steps": steps or run.bundle.sampling.steps, "batch_latency_s": seconds,
                     "ms_per_image": 1000 * seconds / batch, "fid": quality})  # fmt: skip
    return rows


def markdown_table(rows: list[dict], digits: int = 4) -> str:
    """Rows (dicts, keys in first-seen order) as a Markdown table; missing values are blank."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]

    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.{digits}g}"
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key in columns) + " |" for row in rows]
    return "\n".join(lines)
