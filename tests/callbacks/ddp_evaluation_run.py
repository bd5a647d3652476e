"""Run by tests/callbacks/test_evaluation.py: ``python ddp_evaluation_run.py DEVICES OUT_DIR [ddp|fsdp]``.

Fits a tiny DiffusionModule for one step with lr 0 (so the weights are the same whatever the number of
processes) and an ``Evaluation`` callback, then writes each rank's final metrics to ``OUT_DIR/rank<r>.json``
and the gathered features (global sample order) to ``OUT_DIR/rank<r>.pt``.
Lightning starts the extra DDP processes by re-running this script.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from ditlab.callbacks.evaluation import Evaluation
from ditlab.cli import close_process_group
from ditlab.data.digits import DigitsDataModule
from ditlab.diffusion.config import SamplingConfig
from ditlab.distributed import FSDP2Strategy
from ditlab.methods.base import DiffusionModule
from ditlab.models.config import DiTConfig


class RecordingEvaluation(Evaluation):
    """Keeps the all-gathered features so the test can compare them row by row."""

    def _gather(self, trainer, features, logits, per_rank):
        self.gathered = super()._gather(trainer, features, logits, per_rank)
        return self.gathered


def main(devices: int, out: Path, strategy: str = "ddp") -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    network = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                            num_classes=10)  # fmt: skip
    module = DiffusionModule(network=network, sampling=SamplingConfig(sampler="ddim", steps=2, batch_size=5), lr=0.0)
    evaluation = RecordingEvaluation(num_samples=21, steps=2, seed=7)  # 21: unequal shares (11 and 10: 3 and 2 sampling batches of 5)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=devices, strategy=FSDP2Strategy() if strategy == "fsdp" else strategy if devices > 1 else "auto",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[evaluation])  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=8, image_size=8))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(module.summary["metrics"]))
    torch.save([tensor.cpu() for tensor in evaluation.gathered], out / f"rank{trainer.global_rank}.pt")
    close_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:])
