"""In-loop sample quality: FID (Heusel et al., 2017), IS (Salimans et al., 2016) and improved precision/recall
(Kynkaanniemi et al., 2019) of the EMA network, every N steps and at the end of fit.

Protocol: ``num_samples`` images with class-balanced labels ``arange(K) % num_classes``; sample ``i`` draws
its noise from ``seed + i`` whatever the number of processes. Under DDP each rank samples a contiguous
chunk of the global indices, features are all-gathered in global order, and every rank computes the same
numbers, so 1 and 8 processes give the same FID. The feature network lives in this callback, never in
the LightningModule, so checkpoints stay lean; only the evaluation schedule is checkpointed.

A text-conditioned module (``pl_module.text_conditioned`` true) is sampled with captions in place of labels: sample
``i`` gets caption ``i`` of ``captions`` (a file, one caption a line, cycled) or of the digit scenes' validation
split, and ``eval/clip_score`` (Hessel et al., 2021, on ditlab's scene CLIP) is added, with compositional
accuracy (GenEval's per-object checks, Ghosh et al., 2023, on ditlab's scene recognizer:
``eval/compositional_accuracy`` for whole prompts, ``eval/compositional_digit``, ``_colour``, ``_size``, ``_count``,
``_position`` per check) when every caption is in the scenes' grammar; each
rank scores its own share and the sums are reduced, so they too are the same for any number of processes.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from ditlab.callbacks.monitor import live_bar, progress_label, sample_with_progress
from ditlab.distributed import is_sharded
from ditlab.metrics.features import FeatureExtractor, feature_extractor
from ditlab.metrics.fid import compute_metrics
from ditlab.metrics.reference import ReferenceStats, reference_stats
from ditlab.metrics.text_eval import (
    caption_prompts,
    clip_score_of,
    compositional_of,
    compositional_prompts,
    is_text_conditioned,
)
from ditlab.progress import TaskProgress, hosted_by


class Evaluation(L.Callback):
    """Logs ``eval/fid``, ``eval/is``, ``eval/precision``, ``eval/recall``; final values go to summary.json.

    Args:
        every_n_steps: evaluate every this many optimiser steps (0: only at the end of fit).
        num_samples: images per evaluation (in-loop FID is a tracking number; papers use 50K).
        reference: ``digits``, ``scenes`` (digit scenes), an ADM reference batch ``PATH.npz`` or ``cleanfid:NAME``.
        features: ``digits-classifier``, ``inception-v3``, ``scene-clip`` (FID on the scene CLIP, with ``scenes``) or
            ``scene-clip-first`` (on the first recipe's scene CLIP: a space REPA on ``scene-clip`` is not aligned to).
        sampler, steps, cfg_scale: override the module's sampling settings for evaluation.
        seed: seed base; sample ``i`` uses ``seed + i``.
        weights: a local Inception-v3 weight file (``inception-v3`` features only).
        cache_dir: where the digits classifier and reference statistics are cached.
        captions: prompts of text-conditioned runs: a text file (one caption a line) or ``validation`` (the digit
            scenes' validation captions); class-conditional runs ignore it.
        bootstrap: rounds of FID's 95% bootstrap interval (``eval/fid_interval`` in the summary; 0: none).
    """

    def __init__(self, every_n_steps: int = 0, num_samples: int = 1000, reference: str = "digits",
                 features: str = "digits-classifier", sampler: str | None = None, steps: int | None = None,
                 cfg_scale: float | None = None, seed: int = 0, weights: str | None = None,
                 cache_dir: str | None = None, captions: str = "validation", bootstrap: int = 0) -> None:  # fmt: skip
        if num_samples < 4:
            raise ValueError(
                f"Evaluation num_samples={num_samples} is too few; use at least 4 (k=3 neighbours)"
            )
        if every_n_steps < 0:
            raise ValueError(
                f"Evaluation every_n_steps={every_n_steps} must be >= 0 (0: only at the end of fit)"
            )
        self.every_n_steps, self.num_samples, self.seed = every_n_steps, num_samples, seed
        self.reference, self.features = reference, features
        self.weights, self.cache_dir, self.captions, self.bootstrap = weights, cache_dir, captions, bootstrap
        self.overrides = {k: v for k, v in {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale}.items()
                          if v is not None}  # fmt: skip
        self.last_step: int | None = None
        self.last_metrics: dict = {}
        self.history: list[tuple[int, dict]] = []  # every (step, metrics) measured: the run's quality curve
        self._extractor: FeatureExtractor | None = None

    @property
    def state_key(self) -> str:
        """Distinct per protocol, so two Evaluation callbacks (say digits and Inception, or a tracking curve and a
        final evaluation with a bootstrap interval) checkpoint apart."""
        interval = {"bootstrap": self.bootstrap} if self.bootstrap else {}  # keys of runs without one stay as they were
        return self._generate_state_key(
            reference=self.reference, features=self.features, num_samples=self.num_samples, **interval
        )

    # ------------------------------------------------------------------------------- feature network
    def extractor(self, trainer: L.Trainer | None = None) -> FeatureExtractor:
        """The feature network, built once (on rank 0 first, so the digits classifier is trained once)."""
        if self._extractor is None:
            options = (
                {"weights": self.weights}
                if self.features == "inception-v3"
                else {"cache_dir": self.cache_dir}
            )
            distributed = trainer is not None and trainer.world_size > 1
            if distributed and not trainer.is_global_zero:
                trainer.strategy.barrier("ditlab-evaluation-features")
            self._extractor = feature_extractor(self.features, **options)
            if distributed and trainer.is_global_zero:
                trainer.strategy.barrier("ditlab-evaluation-features")
        return self._extractor

    def reference_stats(self, image_size: int, progress: bool = False) -> ReferenceStats:
        return reference_stats(self.reference, self._extractor, image_size=image_size, cache_dir=self.cache_dir,
                               progress=progress)  # fmt: skip

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.extractor(trainer).to(pl_module.device)
            if is_text_conditioned(pl_module):
                self.text_networks(trainer)

    def text_networks(self, trainer: L.Trainer | None = None) -> None:
        """Build (or load) the scene CLIP and the scene recognizer before the first evaluation, on rank 0 first,
        so a missing cache entry is trained once, not once per process."""
        from ditlab.metrics import text_eval

        distributed = trainer is not None and trainer.world_size > 1
        if distributed and not trainer.is_global_zero:
            trainer.strategy.barrier("ditlab-evaluation-text")
        text_eval._scene_clip(self.cache_dir)
        if compositional_prompts(caption_prompts(self.captions, self.num_samples)):
            text_eval._scene_recognizer(self.cache_dir)
        if distributed and trainer.is_global_zero:
            trainer.strategy.barrier("ditlab-evaluation-text")

    # ------------------------------------------------------------------------------- evaluation
    def local_range(self, rank: int, world_size: int) -> tuple[int, int]:
        """Global sample indices ``[start, stop)`` this rank draws (contiguous chunks of equal size)."""
        per_rank = math.ceil(self.num_samples / world_size)
        return min(rank * per_rank, self.num_samples), min((rank + 1) * per_rank, self.num_samples)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module) -> dict:
        """Sample this rank's share, gather features from all ranks, and compute the metrics everywhere; rank 0
        reports progress (in the fit's step bar in a terminal, as lines in a log)."""
        with hosted_by(live_bar(trainer)):
            return self._evaluate(trainer, pl_module)

    def sample_share(self, trainer: L.Trainer, pl_module, labels: torch.Tensor | list[str], start: int) -> torch.Tensor:
        """This rank's ``labels`` (global indices from ``start``), with progress on rank 0."""
        description = progress_label(trainer, f"evaluation sampling at step {trainer.global_step}")
        with TaskProgress(description or "", len(labels), enabled=description is not None) as bar:
            return sample_with_progress(pl_module, labels, bar, seed=self.seed, start=start, **self.overrides)

    def _evaluate(self, trainer: L.Trainer, pl_module) -> dict:
        extractor = self.extractor(trainer).to(pl_module.device)
        text = is_text_conditioned(pl_module)
        if text:
            labels = caption_prompts(self.captions, self.num_samples)
        else:
            labels = torch.arange(self.num_samples) % pl_module.sampling_network.num_classes
        start, stop = self.local_range(trainer.global_rank, trainer.world_size)
        per_rank = math.ceil(self.num_samples / trainer.world_size)
        # a sharded network needs every process in every forward pass: all draw per_rank images, extras dropped
        count = per_rank if is_sharded(pl_module) else stop - start
        if count > 0:
            indices = torch.arange(start, start + count) % self.num_samples
            share = [labels[i] for i in indices.tolist()] if text else labels[indices]
            images = self.sample_share(trainer, pl_module, share, start)[: stop - start]
        if stop > start:
            features, logits = extractor.features_and_logits(images.to(pl_module.device))
        else:  # more ranks than samples: this one contributes padding only
            images = None
            features = torch.zeros(0, extractor.num_features, device=pl_module.device)
            logits = torch.zeros(0, 0, device=pl_module.device)
        image_size = torch.tensor(images.shape[-1] if images is not None else 0, device=pl_module.device)
        features, logits = self._gather(trainer, features, logits, per_rank)
        image_size = int(self._max(trainer, image_size))
        reference = self.reference_stats(image_size, progress=trainer.is_global_zero)
        metrics = compute_metrics(features.cpu(), logits.cpu(), reference, extractor.name, bootstrap=self.bootstrap)
        if text:  # every rank joins the reduction, a rank without samples with no pairs
            pairs = (images, labels[start:stop]) if stop > start else (None, [])
            metrics.update(clip_score_of(*pairs, device=pl_module.device, cache_dir=self.cache_dir))
            if compositional_prompts(labels):  # the same answer on every rank: all hold every prompt
                metrics.update(compositional_of(*pairs, device=pl_module.device, cache_dir=self.cache_dir))
        self.last_step, self.last_metrics = trainer.global_step, metrics
        self.history.append((trainer.global_step, dict(metrics)))
        return metrics

    def curve(self, key: str = "fid") -> list[tuple[int, float]]:
        """``(step, value)`` of one metric at every evaluation so far (a resumed run keeps the earlier points)."""
        return [(step, float(metrics[key])) for step, metrics in self.history if key in metrics]

    def _gather(self, trainer, features, logits, per_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' rows in global-index order (ranks pad their chunk to ``per_rank`` rows, then trim)."""
        if trainer.world_size == 1:
            return features, logits
        count = torch.tensor(len(features), device=features.device)
        num_logits = self._max(trainer, torch.tensor(logits.shape[1], device=features.device))
        padded_features = features.new_zeros(per_rank, features.shape[1])
        padded_features[: len(features)] = features
        padded_logits = features.new_zeros(per_rank, int(num_logits))
        padded_logits[: len(logits)] = logits
        counts = trainer.strategy.all_gather(count).flatten().tolist()
        all_features = trainer.strategy.all_gather(padded_features)
        all_logits = trainer.strategy.all_gather(padded_logits)
        features = torch.cat([rows[:n] for rows, n in zip(all_features, counts)])
        logits = torch.cat([rows[:n] for rows, n in zip(all_logits, counts)])
        return features, logits

    @staticmethod
    def _max(trainer, value: torch.Tensor) -> torch.Tensor:
        return trainer.strategy.all_gather(value).max() if trainer.world_size > 1 else value

    def log_metrics(self, trainer: L.Trainer, pl_module, metrics: dict) -> None:
        """Numbers to the loggers and ``trainer.callback_metrics`` (so ``ModelCheckpoint(monitor="eval/fid")`` works)."""
        numbers = {f"eval/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and k != "reference_samples"}  # fmt: skip
        for name, value in numbers.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(numbers, step=trainer.global_step)

    def record_summary(self, trainer: L.Trainer, pl_module) -> None:
        """Final metrics into ``pl_module.summary["metrics"]`` (merged), the protocol under ``"evaluation"``."""
        summary = getattr(pl_module, "summary", None)
        if summary is None or not self.last_metrics:
            return
        metrics = summary.setdefault("metrics", {})
        metrics.update({f"eval/{k}": v for k, v in self.last_metrics.items()})
        sampling = getattr(pl_module, "sampling", None)
        protocol = {"step": self.last_step, "num_samples": self.num_samples, "reference": self.reference,
                    "features": self.last_metrics["fid_features"], "seed": self.seed,
                    "labels": "arange(num_samples) % num_classes"}  # fmt: skip
        if is_text_conditioned(pl_module):
            protocol["labels"] = f"captions {self.captions!r}, sample i gets caption i (cycled)"
        for key in ("sampler", "steps", "cfg_scale"):
            protocol[key] = self.overrides.get(key, getattr(sampling, key, None))
        summary["evaluation"] = protocol

    def run(self, trainer: L.Trainer, pl_module) -> None:
        metrics = self.evaluate(trainer, pl_module)
        self.log_metrics(trainer, pl_module, metrics)
        self.record_summary(trainer, pl_module)

    # ------------------------------------------------------------------------------- hooks
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.last_step != trainer.global_step or not self.last_metrics:
            self.run(trainer, pl_module)
        else:
            self.record_summary(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "last_metrics": dict(self.last_metrics),
                "history": [[step, dict(metrics)] for step, metrics in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_step = state_dict.get("last_step")
        self.last_metrics = dict(state_dict.get("last_metrics") or {})
        self.history = [(int(step), dict(metrics)) for step, metrics in state_dict.get("history") or []]
