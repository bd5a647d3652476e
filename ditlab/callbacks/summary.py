"""``summary.json``: one file per run that says what was run and what came out.

Written at the end of fit in the log directory (final metrics, parameters total and activated, FLOPs per image,
training images/s, steps, wall time, peak memory per process, the resolved config, and whatever callbacks put in
``pl_module.summary``); its path is printed so scripts and notebooks can find it. A run stopped by a full disk (an
end-of-run or periodic checkpoint, a sample grid, TensorBoard) still writes it, with the reason under ``stopped``,
so its numbers survive: the summary is small, and the failed write has given its space back.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch

from ditlab.atomic import disk_full, note_saved, out_of_space, save_json
from ditlab.callbacks.run_dir import run_dir
from ditlab.models import budget


def _plain(value):
    """Tensors and numpy scalars -> JSON numbers; non-finite -> None."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and not isinstance(value, list | dict):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def resident_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its peak (``VmHWM``) in MiB; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0.0


def reset_peak_memory(device: torch.device) -> float:
    """Restart the peak-memory mark at the start of training; returns the memory in use now (MiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as clear:  # "5": peak RSS := current RSS (Linux)
            clear.write("5")
    except OSError:
        pass
    return resident_mb()


def local_peak_mb(device: torch.device) -> float:
    """This process's peak memory in MiB: allocated accelerator memory on GPU, peak resident set on CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else resident_mb("VmHWM")


def peak_memory_mb(trainer: L.Trainer, device: torch.device, at_start: float) -> dict[str, list[float]]:
    """Every process's peak memory during training and its rise over the start (rank order): allocated
    accelerator memory on GPU, resident set size on CPU (which includes the ~1 GiB of loaded libraries)."""
    peak = local_peak_mb(device)
    values = torch.tensor([float(peak), float(peak - at_start)], device=device)
    if trainer.world_size > 1:
        values = trainer.strategy.all_gather(values)
    values = values.reshape(-1, 2).tolist()
    return {"peak_memory_mb": [round(row[0], 1) for row in values],
            "training_memory_rise_mb": [round(row[1], 1) for row in values]}  # fmt: skip


def network_costs(pl_module) -> dict:
    """Activated parameters (what one image uses: sparse experts, a block mixture) and forward FLOPs per image of
    the sampled network, beside its total ``parameters``; empty for a module without a DiT."""
    network = getattr(pl_module, "sampling_network", None)
    if not hasattr(network, "blocks"):
        return {}
    return {"activated_parameters": budget.activated_parameter_count(network),
            "flops_per_image": budget.flops_per_image(network)}  # a routing trunk counts what an image runs


def stop_reason(exception: BaseException, step: int) -> str | None:
    """Why a fit that raised ``exception`` stopped, for ``summary.json``; ``None`` for an error (a crash writes none)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if out_of_space(exception) is not None:
        return str(disk_full(exception))
    if isinstance(exception, SIGTERMException):
        return f"terminated (SIGTERM) after step {step}"
    if isinstance(exception, KeyboardInterrupt):
        return f"interrupted (Ctrl-C) at step {step}"
    return None


class RunSummary(L.Callback):
    """Measures throughput and wall time, then writes ``summary.json``; ``config`` is set by the CLI."""

    def __init__(self, filename: str = "summary.json") -> None:
        self.filename = filename
        self.config: dict | None = None
        self.path: Path | None = None
        self._fit_start = 0.0
        self._train_time = 0.0
        self._images = 0
        self._batch_start = 0.0
        self._memory_at_start = 0.0
        self._machine: dict = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        from ditlab.threads import machine_record

        self._fit_start = time.perf_counter()
        self._machine = {**machine_record(), "processes": trainer.world_size}  # load as the run starts

    def on_train_start(self, trainer, pl_module) -> None:
        self._memory_at_start = reset_peak_memory(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._train_time += time.perf_counter() - self._batch_start
        self._images += len(batch[0]) * trainer.world_size

    def on_fit_end(self, trainer, pl_module) -> None:
        memory = peak_memory_mb(trainer, pl_module.device, self._memory_at_start)  # a collective: all processes
        self.write(trainer, pl_module, memory)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Stopped (Ctrl-C, SIGTERM) or out of space: write the summary of the steps run so far, saying why it
        stopped (no collective: the other processes may be elsewhere)."""
        stopped = stop_reason(exception, trainer.global_step)
        if stopped is None or not self._fit_start or trainer.global_step == 0:
            return
        memory = {"peak_memory_mb": [round(local_peak_mb(pl_module.device), 1)]}
        try:
            self.write(trainer, pl_module, memory, stopped=stopped)
        except OSError as again:
            if out_of_space(again) is None:
                raise
            return  # no room even for the summary: the error names what is saved
        if self.path is not None:
            note_saved(exception, [str(self.path)])

    def write(self, trainer, pl_module, memory: dict, stopped: str | None = None) -> None:
        from ditlab.threads import machine_record

        if not trainer.is_global_zero or not run_dir(trainer):
            return
        metrics = {name: _plain(value) for name, value in trainer.callback_metrics.items()}
        extra = dict(getattr(pl_module, "summary", {}))
        metrics.update(extra.pop("metrics", {}))  # callbacks' final metrics (FID, ...) join the trainer's
        summary = {
            "metrics": metrics,
            "parameters": pl_module.num_parameters() if hasattr(pl_module, "num_parameters") else None,
            **network_costs(pl_module),
            "train_images_per_s": self._images / self._train_time if self._train_time else None,
            "steps": trainer.global_step,
            "skipped_images": getattr(trainer.datamodule, "skipped", None),  # unreadable files (image folders)
            "wall_time_s": time.perf_counter() - self._fit_start,
            "machine": {**self._machine, "load_average_at_end": machine_record()["load_average"]},
            **memory,
            **{key: _plain(value) if not isinstance(value, dict) else value
               for key, value in extra.items()},  # fmt: skip
            "config": self.config,
            **({"stopped": stopped} if stopped else {}),
        }
        self.path = save_json(summary, run_dir(trainer) / self.filename, indent=2, default=str)
        print(f"summary: {self.path} (logs, checkpoints and samples of this run: {self.path.parent})", flush=True)
