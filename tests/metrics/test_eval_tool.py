"""``ditlab eval`` end to end, on a checkpoint from a 2-step fit that also ran the Evaluation callback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ditlab.cli import main

EVALUATION = ["--trainer.callbacks+=ditlab.callbacks.evaluation.Evaluation",
              "--trainer.callbacks.num_samples", "20", "--trainer.callbacks.steps", "2"]  # fmt: skip


@pytest.mark.slow
def test_fit_with_evaluation_then_ditlab_eval(tiny_args, tmp_path, capsys, digits_features):
    assert main(["fit", *tiny_args, "--trainer.max_steps", "2", *EVALUATION]) == 0
    assert "evaluation sampling at step 2: done, 20 images in" in capsys.readouterr().out
    summary = json.loads(next(Path(tmp_path / "runs").rglob("summary.json")).read_text())
    assert summary["metrics"]["eval/fid_features"] == "digits-classifier"
    assert summary["metrics"]["eval/num_samples"] == 20 and summary["metrics"]["eval/fid"] > 0
    assert summary["evaluation"]["steps"] == 2

    ckpt = next(Path(tmp_path / "runs").rglob("last.ckpt"))
    out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(ckpt), "--num", "20", "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fid_features       digits-classifier" in printed and "metrics.json" in printed
    assert "sampling: done, 20 images in" in printed  # progress, as lines when stdout is not a terminal
    assert "digits-classifier features: done, 20 images in" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fid_features"] == "digits-classifier" and metrics["num_samples"] == 20
    assert {"fid", "is", "precision", "recall"} <= set(metrics)
    assert metrics["protocol"]["steps"] == 2 and metrics["protocol"]["ema"] is True
    # the in-loop number and the tool agree up to the tool's uint8 rounding (same network, seeds and labels)
    assert metrics["fid"] == pytest.approx(summary["metrics"]["eval/fid"], rel=0.02)
    batch = np.load(out / "samples.npz")
    assert batch["arr_0"].shape == (20, 16, 16, 1) and batch["arr_0"].dtype == np.uint8
    assert batch["labels"].tolist() == [i % 10 for i in range(20)]

    again = tmp_path / "again"
    assert main(["eval", "--samples", str(out / "samples.npz"), "--out", str(again)]) == 0
    assert json.loads((again / "metrics.json").read_text())["fid"] == pytest.approx(metrics["fid"], rel=1e-9)


def test_eval_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["eval", "--ckpt", str(tmp_path / "none.ckpt"), "--num", "8"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "checkpoint" in error[0] and "does not exist" in error[0]
    np.savez(tmp_path / "batch.npz", images=np.zeros((4, 8, 8, 1), np.uint8))
    assert main(["eval", "--samples", str(tmp_path / "batch.npz")]) == 2
    assert "has no arr_0" in capsys.readouterr().err
    monkeypatch.delenv("DITLAB_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("DITLAB_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DITLAB_CACHE", str(tmp_path / "cache"))
    np.savez(tmp_path / "batch.npz", arr_0=np.zeros((4, 8, 8, 1), np.uint8))
    assert main(["eval", "--samples", str(tmp_path / "batch.npz"), "--features", "inception-v3"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "DITLAB_INCEPTION_WEIGHTS" in error[0]
