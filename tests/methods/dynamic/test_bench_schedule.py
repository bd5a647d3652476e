"""``bench/dynamic.py`` hands DyDiT the lambda schedule in ``DynamicConfig``'s meaning (DyDiT's ``train.py``: the fall
counted from step 0, held at 1 only before the hold step), and DC-DiT the paper's recipe."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "dynamic.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_dynamic", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["dydit-0.7", "dydit-0.5"])
def test_dydit_lambda_falls_from_step_zero_and_reaches_the_target_half_way(bench, name):
    steps = 60
    config = bench.method_config(bench.METHODS[name], argparse.Namespace(steps=steps, router_lr_scale=100.0))
    target = config.flops_target
    assert (config.target_hold_steps, config.target_warmup_steps) == (7, 30)
    assert [config.target_at(step) for step in range(7)] == [1.0] * 7
    assert config.target_at(7) == pytest.approx(1 - (1 - target) * 7 / 30)  # not 1: the fall started at step 0
    assert config.target_at(15) == pytest.approx(1 - (1 - target) * 15 / 30)
    assert config.target_at(30) == pytest.approx(target) and config.target_at(59) == pytest.approx(target)
    assert config.complete_model_steps == 30 and config.router_lr_scale == 100.0


@pytest.mark.parametrize("name", ["dcdit-2x", "dcdit-3x"])
def test_dcdit_uses_the_papers_ratio_weight_and_uniform_timesteps(bench, name):
    """DC-DiT (arXiv 2603.06351 Table 6, AMD-AGI/DynamicChunkingDiT ``config.py``): ratio-loss weight 0.03 in groups of
    16, timesteps drawn uniformly (``train.py``), no FLOPs or complete-model loss."""
    config = bench.method_config(bench.METHODS[name], argparse.Namespace(steps=60, router_lr_scale=100.0))
    assert (config.ratio_weight, config.ratio_group, config.strata) == (0.03, 16, 1)
    assert (config.flops_weight, config.complete_model_steps) == (0.0, 0)
