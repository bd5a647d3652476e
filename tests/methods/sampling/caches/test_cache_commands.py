"""``ditlab sample/eval --cache ...`` and ``ditlab analyze --redundancy`` on a tiny checkpoint, a checkpoint that
recorded the old flat cache form, a policy registered outside ditlab, and the one-line errors for an unknown
policy, a knob out of range or not the policy's, and a sampler the policy cannot serve."""

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
    assert "cache fora: the last batch computed 75%" in capsys.readouterr().out  # FORA's plan: calls 0, 1 and 3
    dit = make_toy_dit()
    objective = ObjectiveConfig().build(dit.learn_sigma)
    policy = build_policy(dit, CacheConfig("fora", {"interval": 2}), objective, "ddim", 4, 2.0)
    expected = sample_images(policy, objective, torch.arange(3), sampler="ddim", steps=4, cfg_scale=2.0)
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], to_uint8(expected))


def test_a_checkpoint_with_the_old_flat_cache_samples_as_before(checkpoints, make_toy_dit):
    """Checkpoints written before policies owned their knobs recorded ``cache: {policy, interval, threshold, ...}``."""
    old_flat = {"policy": "fora", "interval": 2, "threshold": None, "blocks": None, "boundary": None, "order": None,
                "max_skip": None, "warmup": None, "ratio": None, "coefficients": None, "magnitudes": None,
                "path": None}  # fmt: skip
    dit = make_toy_dit()
    sampling = asdict(SamplingConfig(sampler="ddim", steps=4, cfg_scale=2.0, batch_size=8))
    torch.save({"state_dict": {f"network.{k}": v for k, v in dit.state_dict().items()},
                "ditlab": {"dit_config": dit.config.to_dict(), "objective": asdict(ObjectiveConfig()),
                           "sampling": {**sampling, "cache": old_flat}, "vae": None}},
               checkpoints["root"] / "old.ckpt")  # fmt: skip
    out = checkpoints["root"] / "old"
    assert main(["sample", "--ckpt", str(checkpoints["root"] / "old.ckpt"), "--num", "3", "--out", str(out)]) == 0
    objective = ObjectiveConfig().build(dit.learn_sigma)
    earlier = CacheConfig("fora", {"interval": 2, "align": "start"})  # the plan it sampled with: calls 0 and 2
    policy = build_policy(dit, earlier, objective, "ddim", 4, 2.0)
    expected = sample_images(policy, objective, torch.arange(3), sampler="ddim", steps=4, cfg_scale=2.0)
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], to_uint8(expected))


def test_a_policy_registered_outside_ditlab_is_on_the_command_line(checkpoints, make_toy_dit, scaled_policy, capsys):
    assert main(["sample", "--help"]) == 0
    assert "--cache.gain GAIN" in capsys.readouterr().out
    out = checkpoints["root"] / "scaled"
    assert main(["sample", "--ckpt", str(checkpoints["gaussian"]), "--num", "3", "--out", str(out),
                 "--cache", "test-scaled", "--cache.gain", "0.5"]) == 0  # fmt: skip
    dit = make_toy_dit()
    expected = sample_images(scaled_policy(dit, 0.5), ObjectiveConfig().build(dit.learn_sigma), torch.arange(3),
                             sampler="ddim", steps=4, cfg_scale=2.0)  # fmt: skip
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], to_uint8(expected))
    assert "cache.options.gain=3.0 is out of range for the test-scaled policy" in one_line(
        ["sample", "--ckpt", str(checkpoints["gaussian"]), "--out", str(out), "--cache", "test-scaled",
         "--cache.gain", "3"], capsys)  # fmt: skip


def test_analyze_redundancy_writes_a_table_and_a_heatmap(checkpoints):
    out = checkpoints["root"] / "analysis"
    assert main(["analyze", "--ckpt", str(checkpoints["gaussian"]), "--redundancy", "--num-images", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "redundancy.json").read_text())
    assert report["steps"] == 4 and len(report["units"]["mlp"]["cond"]["relative"]["mean"]) == 4  # blocks
    assert (out / "redundancy.png").stat().st_size > 10_000


@pytest.mark.parametrize("tail, checkpoint, expected", [
    (["--cache", "lru"], "gaussian", "unknown cache policy 'lru'"),
    (["--cache", "fora", "--cache.interval", "0"], "gaussian", "cache.options.interval=0 is out of range for the fora"),
    (["--cache", "fora", "--cache.interval", "9"], "gaussian", "cache.options.interval=9 does not fit"),
    (["--cache", "delta-dit", "--cache.boundary", "2"], "gaussian", "cache.options.boundary=2.0 is out of range"),
    (["--cache", "fora", "--cache.threshold", "0.1"], "gaussian", "cache.options.threshold is not a knob of the fora"),
    (["--cache.interval", "2"], "gaussian", "--cache.interval needs a policy"),
    (["--cache", "taylorseer"], "flow", "evaluates the network twice at the same time (heun)"),
])  # fmt: skip
def test_bad_cache_options_are_one_clear_line(checkpoints, tail, checkpoint, expected, capsys):
    for tool in ("sample", "eval"):
        argv = [tool, "--ckpt", str(checkpoints[checkpoint]), "--num", "4", "--out", str(checkpoints["root"] / "x"),
                *tail]  # fmt: skip
        assert expected in one_line(argv, capsys)


def one_line(argv: list[str], capsys) -> str:
    """The one error line ``argv`` ends in."""
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code != 0 and "Traceback" not in captured.err
    assert len(lines) == 1 and lines[0].startswith("ditlab: error: "), captured.err
    return lines[0]
