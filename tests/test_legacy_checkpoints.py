"""Checkpoints written by an earlier ditlab still load and sample bitwise as they did (a user contract).

The files in ``tests/data/legacy`` were written by an old checkout (``make_legacy.py`` there; README.md names the
commit): a plain DiT, a DiT whose sampling config records a feature cache in the old flat form, a SiT, a Dense2MoE
run before and in its Mixture-of-Blocks stage, and a Learning-to-Cache router with its exported plan. Each is read
by today's public entry points (``ditlab sample``, ``ditlab export``, ``load_network``) and must give the very
samples and network outputs the old code gave.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ditlab.cli import main
from ditlab.models.loading import load_network

LEGACY = Path(__file__).parent / "data" / "legacy"

SAMPLES = {  # reference file -> (checkpoint, extra `ditlab sample` arguments)
    "dit": ("dit", []),
    "dit_fora": ("dit_fora", []),  # the cache the checkpoint recorded: fora, interval 2
    "dit_fora.fora2": ("dit_fora", ["--cache", "fora", "--cache.interval", "2"]),
    "dit_fora.nocache": ("dit_fora", ["--cache", "none"]),
    "sit": ("sit", []),
    "dense2moe_carved": ("dense2moe_carved", []),
    "dense2moe_mob": ("dense2moe_mob", []),  # the old code sampled it through load_mixture_of_blocks
    "l2c": ("dit", ["--sampler", "ddim", "--cache", f"plan:{LEGACY / 'l2c.plan.json'}", "--steps", "4"]),
}
FORWARDS = ["dit", "dit_fora", "sit", "dense2moe_carved", "dense2moe_mob"]


def sample(tmp_path: Path, ckpt: str, args: list[str]) -> dict[str, np.ndarray]:
    """``ditlab sample --ckpt LEGACY/<ckpt>.ckpt --num 4 --steps 5 ARGS``: its samples.npz."""
    out = tmp_path / "samples"
    command = ["sample", "--ckpt", str(LEGACY / f"{ckpt}.ckpt"), "--num", "4", "--out", str(out), "--steps", "5"]
    assert main([*command, *args]) == 0
    with np.load(out / "samples.npz") as saved:
        return dict(saved)


@pytest.mark.parametrize("reference", list(SAMPLES))
def test_ditlab_sample_draws_what_the_old_code_drew(tmp_path, reference):
    ckpt, args = SAMPLES[reference]
    with np.load(LEGACY / f"{reference}.samples.npz") as saved:
        expected = dict(saved)
    drawn = sample(tmp_path, ckpt, args)
    np.testing.assert_array_equal(drawn["labels"], expected["labels"])
    np.testing.assert_array_equal(drawn["arr_0"], expected["arr_0"])


def test_the_recorded_cache_changes_the_reference():
    """Sampling without the recorded cache gives other images, so ``dit_fora`` tests that the cache is read."""
    fora, plain = (np.load(LEGACY / f"{name}.samples.npz")["arr_0"] for name in ("dit_fora", "dit_fora.nocache"))
    assert not np.array_equal(fora, plain)


@pytest.mark.parametrize("name", FORWARDS)
def test_load_network_gives_the_old_outputs(name):
    with np.load(LEGACY / f"{name}.forward.npz") as saved:
        x, t, y, expected = (torch.from_numpy(saved[key]) for key in ("x", "t", "y", "out"))
    network = load_network(LEGACY / f"{name}.ckpt")
    with torch.no_grad():  # equal to float rounding: the recorded outputs came from another CPU's kernels
        torch.testing.assert_close(network(x, t, y), expected, rtol=1e-5, atol=1e-5)


def test_router_exports_the_old_plan(tmp_path):
    old = json.loads((LEGACY / "l2c.plan.json").read_text())
    plan = tmp_path / "plan.json"
    assert main(["export", "--ckpt", str(LEGACY / "l2c.ckpt"), "--out", str(plan), "--threshold",
                 repr(old["threshold"])]) == 0  # fmt: skip
    new = json.loads(plan.read_text())
    assert {key: new[key] for key in ("compute", "times", "sampler", "steps", "depth")} == {
        key: old[key] for key in ("compute", "times", "sampler", "steps", "depth")}  # fmt: skip
    assert not all(all(row) for row in new["compute"])  # the plan skips something, so the sample below tests it
