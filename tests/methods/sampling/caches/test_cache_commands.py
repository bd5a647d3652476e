"""``ditlab sample/eval --cache ...`` and ``ditlab analyze --redundancy`` on a tiny checkpoint, and the one-line
errors for an unknown policy, a knob out of range or not the policy's, and a sampler the policy cannot serve."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from ditlab.cli import main
from ditlab.diffusion.config import CacheConfig, ObjectiveConfig, SamplingConfig
from ditlab.diffusion.sample import sample_images
from ditlab.methods.sampling.caches import build_policy
from ditlab.tools.sample import to_uint8


def write_checkpoint(dit, path: Path, objective: ObjectiveConfig, sampling: SamplingConfig) -> Path:
    """What ``DiffusionModule`` saves, without training: the network's weights and the ``ditlab`` entry."""
    torch.save({"state_dict": {f"network.{k}": v for k, v in dit.state_dict().items()},
                "ditlab": {"dit_config": dit.config.to_dict(), "objective": asdict(objective),
                           "sampling": asdict(sampling), "vae": None}}, path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, make_toy_dit) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("accel")
    dit = make_toy_dit()
    sampling = SamplingConfig(sampler="ddim", steps=4, cfg_scale=2.0, batch_size=8)
    flow = SamplingConfig(sampler="heun", steps=3, cfg_scale=2.0, batch_size=8)
    return {"gaussian": write_checkpoint(dit, root / "dit.ckpt", ObjectiveConfig(), sampling),
            "flow": write_checkpoint(dit, root / "sit.ckpt", ObjectiveConfig(kind="flow"), flow),
            "root": root}  # fmt: skip


def test_sample_with_a_cache_writes_what_the_policy_samples(checkpoints, make_toy_dit, capsys):
    out = checkpoints["root"] / "fora"
    assert main(["sample", "--ckpt", str(checkpoints["gaussian"]), "--num", "3", "--out", str(out),
                 "--cache", "fora", "--cache.interval", "2"]) == 0  # fmt: skip
    assert "cache fora: the last batch computed 50%" in capsys.readouterr().out
    dit = make_toy_dit()
    objective = ObjectiveConfig().build(dit.learn_sigma)
    policy = build_policy(dit, CacheConfig("fora", interval=2), objective, "ddim", 4, 2.0)
    expected = sample_images(policy, objective, torch.arange(3), sampler="ddim", steps=4, cfg_scale=2.0)
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], to_uint8(expected))


def test_analyze_redundancy_writes_a_table_and_a_heatmap(checkpoints):
    out = checkpoints["root"] / "analysis"
    assert main(["analyze", "--ckpt", str(checkpoints["gaussian"]), "--redundancy", "--num-images", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "redundancy.json").read_text())
    assert report["steps"] == 4 and len(report["units"]["mlp"]["cond"]["relative"]["mean"]) == 4  # blocks
    assert (out / "redundancy.png").stat().st_size > 10_000


@pytest.mark.parametrize("tail, checkpoint, expected", [
    (["--cache", "lru"], "gaussian", "unknown cache policy 'lru'"),
    (["--cache", "fora", "--cache.interval", "0"], "gaussian", "cache.interval=0 is out of range for the fora"),
    (["--cache", "fora", "--cache.interval", "9"], "gaussian", "cache.interval=9 does not fit"),
    (["--cache", "delta-dit", "--cache.boundary", "2"], "gaussian", "cache.boundary=2.0 is out of range"),
    (["--cache", "fora", "--cache.threshold", "0.1"], "gaussian", "cache.threshold is not a knob of the fora"),
    (["--cache.interval", "2"], "gaussian", "--cache.interval needs a policy"),
    (["--cache", "taylorseer"], "flow", "evaluates the network twice at the same time (heun)"),
])  # fmt: skip
def test_bad_cache_options_are_one_clear_line(checkpoints, tail, checkpoint, expected, capsys):
    for tool in ("sample", "eval"):
        argv = [tool, "--ckpt", str(checkpoints[checkpoint]), "--num", "4", "--out", str(checkpoints["root"] / "x"),
                *tail]  # fmt: skip
        code = main(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code != 0 and "Traceback" not in captured.err
        assert len(lines) == 1 and lines[0].startswith("ditlab: error: ") and expected in lines[0], captured.err
