"""Teacher and student side by side at the end of a compression run, in ``summary.json``.

For both networks, with the same sampler, seeds and conditions: blocks, parameters (total and activated per
image, and the FFN's for experts), forward FLOPs per image, sampling images/s on this machine, and FID against the
reference set with the features it used (``fid_features``), so a reader sees in one place what the compression
cost and what it bought.

Conditions come from :func:`ditlab.metrics.text_eval.sample_conditions`: class labels ``arange(n) % num_classes``,
or for a text-to-image teacher caption ``i`` of ``captions`` for sample ``i`` (the digit scenes' validation
captions by default). Text-to-image networks also get their CLIP score (Hessel et al., 2021, "CLIPScore", on
ditlab's scene CLIP: ``ditlab.metrics.text_eval``) and their compositional accuracy (after GenEval, Ghosh et al.,
2023: ``ditlab.metrics.compositional``; ``compositional_accuracy`` is GenEval's whole-prompt rate, the per-check
rates are under ``compositional``), on the same images as FID. Sampling speed is timed after the captions are
encoded (the frozen text encoder is shared by both networks and not compressed) and after one warm-up image.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import lightning as L
import torch

from ditlab.callbacks.monitor import live_bar, progress_label, sample_with_progress
from ditlab.distributed import gathered, is_sharded
from ditlab.metrics.text_eval import sample_conditions
from ditlab.models.text.prompts import condition_input
from ditlab.progress import TaskProgress, hosted_by

RATIO_KEYS = ("parameters", "activated_parameters", "ffn_activated_parameters", "flops_per_image",
              "sampling_images_per_s", "fid", "clip_score", "compositional_accuracy")  # fmt: skip


def text_scores(images: torch.Tensor, prompts: list[str], device: torch.device | str = "cpu",
                cache_dir: str | None = None) -> dict:  # fmt: skip
    """CLIP score and compositional accuracy of ``images (N, 3, H, W)`` in [-1, 1] drawn for ``prompts``."""
    from ditlab.metrics.text_eval import clip_score_of, compositional_of

    if images.shape[1] != 3:
        raise ValueError(f"CLIP score and compositional accuracy read RGB digit scenes; the samples have "
                         f"{images.shape[1]} channels")  # fmt: skip
    return {**clip_score_of(images, prompts, device=device, cache_dir=cache_dir),
            **compositional_of(images, prompts, device=device, cache_dir=cache_dir)}


class CompressionReport(L.Callback):
    """Writes ``summary["teacher"]``, ``summary["student"]`` and their ratios at the end of fit.

    Args:
        num_samples: images sampled from each network for FID (and CLIP score / compositional accuracy for a
            text-to-image network); seeds ``seed + i``, conditions ``sample_conditions(config, num_samples)``.
        reference: reference statistics for FID (``digits``, ``scenes`` or an ADM-style ``.npz``).
        features: feature network for FID (``digits-classifier``, ``scene-clip`` or ``inception-v3``).
        seed: first noise seed.
        throughput_batch: batch size used to time sampling (at most ``num_samples`` when FID is measured).
        sampler, steps, cfg_scale: override the module's sampling settings (the same for both networks).
        captions: prompts of a text-to-image network: ``validation`` (the digit scenes' validation captions) or a
            text file, one caption a line; caption ``i`` for sample ``i``, cycled. Ignored for class labels.
        text_metrics: CLIP score and compositional accuracy for a text-to-image network (they train the scene CLIP
            and the scene recognizer once, cached, if not yet there).
        cache_dir: where the scene CLIP is cached (None: ``$DITLAB_CACHE``).
    """

    def __init__(self, num_samples: int = 500, reference: str = "digits", features: str = "digits-classifier",
                 seed: int = 0, throughput_batch: int = 64, sampler: str | None = None, steps: int | None = None,
                 cfg_scale: float | None = None, captions: str = "validation", text_metrics: bool = True,
                 cache_dir: str | None = None) -> None:  # fmt: skip
        self.num_samples, self.reference, self.features = num_samples, reference, features
        self.seed, self.throughput_batch = seed, throughput_batch
        self.captions, self.text_metrics, self.cache_dir = captions, text_metrics, cache_dir
        self.overrides = {k: v for k, v in {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale}.items()
                          if v is not None}  # fmt: skip

    def timed_images(self) -> int:
        """Images sampled in one batch to time sampling: ``throughput_batch``, or fewer for a quick look."""
        return min(self.throughput_batch, self.num_samples or self.throughput_batch)

    def conditions(self, network, count: int):
        """The conditions of samples ``0 .. count-1``: class labels or captions (``sample_conditions``)."""
        return sample_conditions(network.config, count, self.captions)

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module, network, name: str) -> dict:
        """Size, sampling speed and sample quality of one network, with a progress line over its images."""
        from ditlab.metrics.fid import evaluate_images

        report = pl_module.describe(network)
        timed = self.timed_images()
        text = network.config.text_conditioned
        with TaskProgress(progress_label(trainer, f"compression report, {name}") or "", timed + self.num_samples) as bar:
            # captions are encoded before the clock starts (the frozen text encoder is built on first use, and it is
            # the same for both networks: the speed-up measured is the compressed network's), and one image is drawn
            # first so one-time costs (lazy imports, first kernel calls) fall on neither network's clock
            labels = condition_input(network.config, self.conditions(network, timed), pl_module.device)
            pl_module.sample(labels[:1], seed=self.seed, network=network, batch_size=1, **self.overrides)
            start = time.perf_counter()
            pl_module.sample(labels, seed=self.seed, network=network, batch_size=timed, **self.overrides)
            report["sampling_images_per_s"] = timed / (time.perf_counter() - start)
            bar.advance(timed)
            if self.num_samples:
                labels = self.conditions(network, self.num_samples)
                images = sample_with_progress(pl_module, labels, bar, seed=self.seed, network=network, **self.overrides)
        if self.num_samples:
            metrics = evaluate_images(images, reference=self.reference, features=self.features)
            report.update({key: metrics[key] for key in ("fid", "fid_features", "num_samples") if key in metrics})
            if text and self.text_metrics:
                report.update(text_scores(images, labels, pl_module.device, self.cache_dir))
        return report

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        student_network = pl_module.sampling_network
        if is_sharded(pl_module):  # rank 0 measures alone, so it needs the whole student (a collective)
            student_network = gathered(student_network)
        if not trainer.is_global_zero:
            return
        steps = self.overrides.get("steps", pl_module.sampling.steps)
        text = student_network.config.text_conditioned
        scores = " (and CLIP score, compositional accuracy)" if text and self.text_metrics else ""
        print(f"{progress_label(trainer, 'compression report')}: teacher and student, {self.timed_images()} images "
              f"timed + {self.num_samples} for FID{scores} each, {steps} steps (a quick look: --eval.num_samples N, "
              "--eval.steps N)", flush=True)  # fmt: skip
        with hosted_by(live_bar(trainer)):  # in a terminal, the tasks join the fit's step bar
            teacher = self.measure(trainer, pl_module, pl_module.teacher, "teacher")
            student = self.measure(trainer, pl_module, student_network, "student")
        ratios = {f"{key}_ratio": student[key] / teacher[key] for key in RATIO_KEYS
                  if key in student and teacher.get(key)}  # fmt: skip
        protocol = {"num_samples": self.num_samples, "timed_images": self.timed_images(), "seed": self.seed,
                    "conditions": (f"captions {self.captions!r}, sample i gets caption i (cycled)" if text
                                   else "arange(n) % num_classes"),
                    **asdict(pl_module.sampling), **self.overrides}  # fmt: skip
        pl_module.summary.update({"teacher": teacher, "student": student, "student_vs_teacher": ratios,
                                  "comparison_protocol": protocol})  # fmt: skip
        for logger in trainer.loggers:
            logger.log_metrics({f"compression/{key}": value for key, value in ratios.items()}, step=trainer.global_step)
        print("compression: " + ", ".join(f"{key}={value:.3g}" for key, value in ratios.items()))
