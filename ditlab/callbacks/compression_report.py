"""Teacher and student side by side at the end of a compression run, in ``summary.json``.

For both networks, with the same sampler, seeds and class labels: blocks, parameters (total and activated per
image, and the FFN's for experts), forward FLOPs per
image, sampling images/s on this machine, and FID against the reference set with the features it used
(``fid_features``), so a reader sees in one place what the compression cost and what it bought.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import lightning as L
import torch

from ditlab.callbacks.monitor import live_bar, progress_label, sample_with_progress
from ditlab.distributed import gathered, is_sharded
from ditlab.progress import TaskProgress, hosted_by


class CompressionReport(L.Callback):
    """Writes ``summary["teacher"]``, ``summary["student"]`` and their ratios at the end of fit.

    Args:
        num_samples: images sampled from each network for FID (class-balanced, seeds ``seed + i``).
        reference: reference statistics for FID (``digits`` or an ADM-style ``.npz``).
        features: feature network for FID (``digits-classifier`` or ``inception-v3``).
        seed: first noise seed.
        throughput_batch: batch size used to time sampling (at most ``num_samples`` when FID is measured).
        sampler, steps, cfg_scale: override the module's sampling settings (the same for both networks).
    """

    def __init__(self, num_samples: int = 500, reference: str = "digits", features: str = "digits-classifier",
                 seed: int = 0, throughput_batch: int = 64, sampler: str | None = None, steps: int | None = None,
                 cfg_scale: float | None = None) -> None:  # fmt: skip
        self.num_samples, self.reference, self.features = num_samples, reference, features
        self.seed, self.throughput_batch = seed, throughput_batch
        self.overrides = {k: v for k, v in {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale}.items()
                          if v is not None}  # fmt: skip

    def timed_images(self) -> int:
        """Images sampled in one batch to time sampling: ``throughput_batch``, or fewer for a quick look."""
        return min(self.throughput_batch, self.num_samples or self.throughput_batch)

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module, network, name: str) -> dict:
        """Size, sampling speed and sample quality of one network, with a progress line over its images."""
        from ditlab.metrics.fid import evaluate_images

        report = pl_module.describe(network)
        num_classes = network.num_classes
        timed = self.timed_images()
        labels = torch.arange(timed) % num_classes
        with TaskProgress(progress_label(trainer, f"compression report, {name}") or "", timed + self.num_samples) as bar:
            start = time.perf_counter()
            pl_module.sample(labels, seed=self.seed, network=network, batch_size=timed, **self.overrides)
            report["sampling_images_per_s"] = timed / (time.perf_counter() - start)
            bar.advance(timed)
            if self.num_samples:
                labels = torch.arange(self.num_samples) % num_classes
                images = sample_with_progress(pl_module, labels, bar, seed=self.seed, network=network, **self.overrides)
        if self.num_samples:
            metrics = evaluate_images(images, reference=self.reference, features=self.features)
            report.update({key: metrics[key] for key in ("fid", "fid_features", "num_samples") if key in metrics})
        return report

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        student_network = pl_module.sampling_network
        if is_sharded(pl_module):  # rank 0 measures alone, so it needs the whole student (a collective)
            student_network = gathered(student_network)
        if not trainer.is_global_zero:
            return
        steps = self.overrides.get("steps", pl_module.sampling.steps)
        print(f"{progress_label(trainer, 'compression report')}: teacher and student, {self.timed_images()} images "
              f"timed + {self.num_samples} for FID each, {steps} steps (a quick look: --eval.num_samples N, "
              "--eval.steps N)", flush=True)  # fmt: skip
        with hosted_by(live_bar(trainer)):  # in a terminal, the tasks join the fit's step bar
            teacher = self.measure(trainer, pl_module, pl_module.teacher, "teacher")
            student = self.measure(trainer, pl_module, student_network, "student")
        ratios = {f"{key}_ratio": student[key] / teacher[key]
                  for key in ("parameters", "activated_parameters", "ffn_activated_parameters", "flops_per_image",
                              "sampling_images_per_s", "fid")
                  if key in student and teacher.get(key)}  # fmt: skip
        protocol = {"num_samples": self.num_samples, "timed_images": self.timed_images(), "seed": self.seed,
                    **asdict(pl_module.sampling), **self.overrides}  # fmt: skip
        pl_module.summary.update({"teacher": teacher, "student": student, "student_vs_teacher": ratios,
                                  "comparison_protocol": protocol})  # fmt: skip
        for logger in trainer.loggers:
            logger.log_metrics({f"compression/{key}": value for key, value in ratios.items()}, step=trainer.global_step)
        print("compression: " + ", ".join(f"{key}={value:.3g}" for key, value in ratios.items()))
