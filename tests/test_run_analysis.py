"""ditlab.analysis on hand-made runs: a tiny DiT checkpoint, a summary.json and TensorBoard events."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from ditlab import analysis
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.models.dit import DiT


def make_run(folder: Path, seed: int, summary: dict | None = None, depth: int = 2) -> Path:
    """A run directory with summary.json and a ditlab-style final.ckpt of a random 8x8 digits DiT."""
    torch.manual_seed(seed)
    network = DiT(
        input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=depth, num_heads=2, num_classes=10
    )
    with torch.no_grad():  # adaLN-Zero starts every network at output zero: give each its own function
        for parameter in network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    checkpoint = {
        "state_dict": {f"ema.{key}": value for key, value in network.state_dict().items()},
        "ditlab": {"dit_config": network.config.to_dict(), "objective": asdict(ObjectiveConfig()),
                   "sampling": asdict(SamplingConfig(steps=3, cfg_scale=1.0)), "vae": None, "latent_scale": 1.0},
    }  # fmt: skip
    (folder / "checkpoints").mkdir(parents=True)
    torch.save(checkpoint, folder / "checkpoints" / "final.ckpt")
    default = {"metrics": {"val/loss": 0.5, "train/loss": 0.6}, "parameters": 1234, "steps": 10}
    (folder / "summary.json").write_text(json.dumps(summary or default))
    return folder


@pytest.fixture
def two_runs(tmp_path: Path) -> list[analysis.Run]:
    first = make_run(tmp_path / "runs" / "dit" / "version_0", seed=0)
    second = make_run(tmp_path / "runs" / "dit" / "version_1", seed=1, depth=3)
    os.utime(first / "summary.json", (1, 1))  # older
    return [analysis.load_run(first), analysis.load_run(second)]


def test_find_runs_newest_first_and_load_run_errors(tmp_path, two_runs):
    found = analysis.find_runs(tmp_path / "runs", newest=2)
    assert [path.name for path in found] == ["version_1", "version_0"]
    assert analysis.find_runs(tmp_path / "runs", newest=1) == found[:1]
    assert two_runs[0].name == "dit/version_0" and two_runs[0].checkpoint.name == "final.ckpt"
    with pytest.raises(FileNotFoundError, match="summary.json does not exist"):
        analysis.load_run(tmp_path / "nowhere")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "summary.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no checkpoints/final.ckpt"):
        _ = analysis.load_run(tmp_path / "bare").bundle


def test_same_seeds_give_the_same_noise_and_rows_differ_only_by_network(two_runs):
    labels = torch.tensor([0, 3, 7])
    again = analysis.load_run(two_runs[0].path)
    grid = analysis.side_by_side([two_runs[0], again, two_runs[1]], labels, seed=5)
    assert grid.shape[-1] == 3 and 0 <= grid.min() and grid.max() <= 1
    rows = analysis.sample_run(two_runs[0], labels, seed=5), analysis.sample_run(again, labels, seed=5)
    assert torch.equal(rows[0], rows[1]), "same checkpoint, same seeds: identical samples"
    assert not torch.allclose(rows[0], analysis.sample_run(two_runs[1], labels, seed=5))
    assert not torch.allclose(rows[0], analysis.sample_run(two_runs[0], labels, seed=6))
    third = grid.shape[0] // 3  # the first two rows of the side-by-side grid are the same pixels
    assert torch.equal(grid[:third], grid[third : 2 * third])


def test_class_grid_has_one_row_per_class(two_runs):
    grid = analysis.class_grid(two_runs[0], per_class=2, classes=4, steps=2)
    cell = 8 * (48 // 8) + 2  # upscaled 8x8 digits plus padding
    assert grid.shape == (4 * cell + 2, 2 * cell + 2, 3)
    assert torch.equal(analysis.class_labels(3, 2), torch.tensor([0, 0, 1, 1, 2, 2]))


def test_metrics_table_adds_teacher_and_student_rows(tmp_path):
    summary = {"metrics": {"val/loss": 0.25}, "parameters": 10, "steps": 7,
               "teacher": {"blocks": 6, "parameters": 300_000, "fid": 12.5, "fid_features": "digits-classifier"},
               "student": {"blocks": 3, "parameters": 150_000, "fid": 20.0, "fid_features": "digits-classifier"}}  # fmt: skip
    run = analysis.load_run(make_run(tmp_path / "dicomp" / "version_0", seed=0, summary=summary))
    rows = analysis.metrics_table([run])
    assert [row["run"] for row in rows] == [
        "dicomp/version_0",
        "dicomp/version_0 [teacher]",
        "dicomp/version_0 [student]",
    ]
    assert rows[0]["val/loss"] == 0.25 and rows[0]["eval/fid"] is None
    assert rows[2]["blocks"] == 3 and rows[2]["eval/fid"] == 20.0
    table = analysis.markdown_table(rows).splitlines()
    assert table[0].startswith("| run | steps | parameters | val/loss") and "blocks" in table[0]
    assert "| dicomp/version_0 [teacher] |  | 300,000 |" in table[3] and "12.5" in table[3]


def test_fid_vs_step_reads_tensorboard_scalars(two_runs):
    from torch.utils.tensorboard import SummaryWriter

    run = two_runs[0]
    assert analysis.fid_vs_step(run) == []
    with SummaryWriter(str(run.path)) as writer:
        for step, value in ((100, 80.0), (200, 40.0), (300, 20.0)):
            writer.add_scalar("eval/fid", value, step)
    assert analysis.fid_vs_step(run) == [(100, 80.0), (200, 40.0), (300, 20.0)]


def test_fid_vs_nfe_scores_the_same_labels_at_each_step_count(two_runs):
    rows = analysis.fid_vs_nfe(two_runs[0], steps=(1, 3), num_samples=20)
    assert [row["steps"] for row in rows] == [1, 3] and [row["nfe"] for row in rows] == [1, 3]
    assert all(math.isfinite(row["fid"]) and row["fid"] > 0 for row in rows)
    assert rows[0]["fid"] != rows[1]["fid"], "different step counts must give different samples"
    assert rows[0]["fid_features"] == "digits-classifier" and rows[0]["num_samples"] == 20
    assert analysis.function_evaluations(10, "heun", 1.0) == 19


def test_latency_table_measures_each_run(two_runs):
    rows = analysis.latency_table(two_runs, batch=4, steps=2, fid={"dit/version_1": 3.5})
    assert [row["blocks"] for row in rows] == [2, 3]
    assert rows[1]["parameters"] > rows[0]["parameters"] == analysis.parameter_count(two_runs[0])
    assert all(row["batch_latency_s"] > 0 and row["ms_per_image"] > 0 for row in rows)
    assert rows[1]["fid"] == 3.5 and rows[0]["fid"] is None


def test_first_reach_interpolates_between_evaluations():
    from ditlab.analysis import first_reach

    curve = [(100, 80.0), (200, 40.0), (300, 30.0), (400, 35.0)]
    assert first_reach(curve, 60.0) == 150.0  # halfway from 80 to 40
    assert first_reach(curve, 30.0) == 300.0
    assert first_reach(curve, 90.0) == 100.0  # already there at the first evaluation
    assert first_reach(curve, 20.0) is None
    assert first_reach([[100, 50.0], [200, 10.0]], 30.0) == 150.0  # JSON's lists work as well
