"""The Evaluation callback: metrics in the loggers and summary.json, checkpointed schedule, DDP equivalence."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from ditlab.callbacks.evaluation import Evaluation
from ditlab.callbacks.summary import RunSummary
from ditlab.data.digits import DigitsDataModule
from ditlab.diffusion.config import SamplingConfig
from ditlab.methods.base import DiffusionModule
from ditlab.metrics.features import digits_classifier
from ditlab.models.config import DiTConfig

HERE = Path(__file__).resolve().parent
TINY_NET = DiTConfig(
    input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10
)


@pytest.fixture(scope="module", autouse=True)
def trained_classifier():
    """Train (or load) the digits classifier once, before any fit or subprocess needs it."""
    return digits_classifier()


def tiny_fit(tmp_path: Path, evaluation: Evaluation, max_steps: int = 2):
    L.seed_everything(0)
    module = DiffusionModule(
        network=TINY_NET, sampling=SamplingConfig(sampler="ddim", steps=2), ema_decay=0.9
    )
    module.summary["metrics"] = {"teacher/fid": 12.5}  # another callback's entry: must survive
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=CSVLogger(tmp_path, name="run"),
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[evaluation, RunSummary()])  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=16, image_size=8))
    return trainer, module


@pytest.mark.slow
def test_metrics_reach_loggers_summary_and_checkpoint(tmp_path):
    evaluation = Evaluation(every_n_steps=1, num_samples=20, steps=2)
    trainer, module = tiny_fit(tmp_path, evaluation)
    metrics = module.summary["metrics"]
    assert metrics["teacher/fid"] == 12.5
    assert metrics["eval/fid_features"] == "digits-classifier" and metrics["eval/num_samples"] == 20
    assert metrics["eval/fid"] > 0 and 1.0 <= metrics["eval/is"] <= 10.0
    assert 0.0 <= metrics["eval/precision"] <= 1.0 and 0.0 <= metrics["eval/recall"] <= 1.0
    assert module.summary["evaluation"]["step"] == 2 and module.summary["evaluation"]["steps"] == 2
    assert module.summary["evaluation"]["sampler"] == "ddim"
    assert float(trainer.callback_metrics["eval/fid"]) == pytest.approx(metrics["eval/fid"])

    summary = json.loads((Path(trainer.log_dir) / "summary.json").read_text())
    assert summary["metrics"]["eval/fid"] == pytest.approx(metrics["eval/fid"])
    assert summary["evaluation"]["features"] == "digits-classifier"

    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = {int(row["step"]): float(row["eval/fid"]) for row in rows if row.get("eval/fid")}
    assert sorted(logged) == [1, 2]  # every step, and no second evaluation at the end of fit
    assert logged[2] == pytest.approx(metrics["eval/fid"])

    assert "digits" not in " ".join(module.state_dict())  # the feature network never enters the module
    assert not any(key.startswith(("_extractor", "network.body")) for key in module.state_dict())
    checkpoint = torch.load(next(Path(tmp_path).rglob("*.ckpt")), weights_only=False)
    state = next(value for key, value in checkpoint["callbacks"].items() if key.startswith("Evaluation"))
    assert state["last_step"] == 2 and state["last_metrics"]["fid"] == pytest.approx(metrics["eval/fid"])
    assert [step for step, _ in state["history"]] == [1, 2]  # the curve travels with the checkpoint
    curve = evaluation.curve()
    assert [step for step, _ in curve] == [1, 2] and curve[-1][1] == pytest.approx(metrics["eval/fid"])


def test_a_final_evaluation_with_bootstrap_sits_beside_a_tracking_curve(tmp_path):
    tracking = Evaluation(every_n_steps=1, num_samples=8, steps=2)
    final = Evaluation(num_samples=24, steps=2, bootstrap=40)  # only at the end of fit, with FID's interval
    L.seed_everything(0)
    module = DiffusionModule(network=TINY_NET, sampling=SamplingConfig(sampler="ddim", steps=2), ema_decay=0.9)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[tracking, final])  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=16, image_size=8))
    assert [step for step, _ in tracking.history] == [1, 2] and [step for step, _ in final.history] == [2]
    assert final.last_metrics["num_samples"] == 24 and tracking.last_metrics["num_samples"] == 8
    low, high = final.last_metrics["fid_interval"]
    assert 0 <= low < high and "fid_interval" not in tracking.last_metrics


def test_two_evaluations_differing_only_in_their_interval_checkpoint_apart():
    plain, with_interval = Evaluation(num_samples=24), Evaluation(num_samples=24, bootstrap=200)
    assert plain.state_key != with_interval.state_key
    assert plain.state_key == Evaluation(num_samples=24, bootstrap=0).state_key  # old checkpoints keep their key
    assert "bootstrap" not in plain.state_key


def test_state_round_trip_skips_a_repeated_final_evaluation():
    first = Evaluation(num_samples=8)
    first.last_step, first.last_metrics = 40, {"fid": 3.0, "fid_features": "digits-classifier"}
    first.history = [(20, {"fid": 5.0}), (40, dict(first.last_metrics))]
    resumed = Evaluation(num_samples=8)
    resumed.load_state_dict(first.state_dict())
    assert resumed.last_step == 40 and resumed.last_metrics["fid"] == 3.0
    assert resumed.curve() == [(20, 5.0), (40, 3.0)]

    class Stub:
        global_step = 40
        summary: dict = {}
        sampling = SamplingConfig(sampler="ddim", steps=5)

    stub = Stub()
    resumed.run = lambda *args: pytest.fail("evaluated again at an already evaluated step")
    resumed.on_train_end(stub, stub)
    assert stub.summary["metrics"]["eval/fid"] == 3.0 and stub.summary["evaluation"]["steps"] == 5


def test_ranks_draw_contiguous_disjoint_chunks_of_the_global_indices():
    evaluation = Evaluation(num_samples=21)
    for world_size in (1, 2, 3, 4, 8, 32):
        chunks = [evaluation.local_range(rank, world_size) for rank in range(world_size)]
        indices = [i for start, stop in chunks for i in range(start, stop)]
        assert indices == list(range(21))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_samples"):
        Evaluation(num_samples=2)
    with pytest.raises(ValueError, match="every_n_steps"):
        Evaluation(every_n_steps=-1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])  # fsdp: every rank joins each sharded forward pass
def test_distributed_fid_equals_single_process_fid(tmp_path, strategy):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}"
        subprocess.run([sys.executable, str(HERE / "ddp_evaluation_run.py"), str(devices), str(out), strategy],
                       check=True, timeout=240, env=env, cwd=tmp_path, capture_output=True)  # fmt: skip
        results[devices] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]
    single = results[1][0]
    assert single["eval/num_samples"] == 21
    single_features, single_logits = torch.load(tmp_path / "devices1" / "rank0.pt")
    assert single_features.shape == (21, 64)
    for rank in range(2):  # every rank holds the same numbers, from the same samples in the same order
        rank_metrics = results[2][rank]
        assert rank_metrics["eval/num_samples"] == 21
        for key in ("eval/fid", "eval/is", "eval/precision", "eval/recall"):
            assert rank_metrics[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key
        features, logits = torch.load(tmp_path / "devices2" / f"rank{rank}.pt")
        torch.testing.assert_close(features, single_features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, single_logits, rtol=1e-5, atol=1e-5)
