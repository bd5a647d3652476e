"""Block selection: each criterion's contract, the identity-block and timestep cases of the specs, the CLI."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from ditlab.cli import main as cli_main
from ditlab.data.digits import digits_tensors
from ditlab.diffusion import FlowMatching, GaussianDiffusion
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.compress.analysis import (
    CRITERIA,
    Selection,
    additivity,
    additivity_diagnostic,
    aggregate_bins,
    amber_importance,
    calibration_set,
    importance_table,
    plot_importance,
    rank_keep,
    select_blocks,
)
from ditlab.models.dit import DiT
from ditlab.tools.analyze import main as analyze_main

DEPTH, IDENTITY = 6, (2, 3)


@pytest.fixture(scope="module")
def toy_dit(tiny_dit):
    """``toy_dit(depth=6, identity=(2, 3), scale=0.1)``: the tiny digits DiT with random adaLN/output layers;
    ``identity`` blocks have zero gates (exact skip)."""

    def build(depth: int = DEPTH, identity: tuple[int, ...] = IDENTITY, scale: float = 0.1) -> DiT:
        dit = tiny_dit(depth=depth, std=scale)
        with torch.no_grad():
            for index in identity:
                dit.blocks[index].adaLN_modulation[-1].weight.zero_()
                dit.blocks[index].adaLN_modulation[-1].bias.zero_()
        return dit

    return build


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits_tensors(image_size=8)
    return images[:64], labels[:64]


@pytest.fixture(scope="module")
def dit(toy_dit) -> DiT:
    return toy_dit()


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_keeps_exactly_num_keep_sorted_blocks(criterion, dit, digits):
    objective = GaussianDiffusion() if criterion in ("laptop", "ppcl") else FlowMatching()
    # one group over the whole depth: an N:M layer mask that can keep any number of blocks
    options = {"group_size": DEPTH, "steps": 3} if criterion == "tinyfusion" else {}
    for num_keep in (1, 3, DEPTH):
        selection = select_blocks(dit, objective, *digits, criterion, num_keep, **options)
        assert isinstance(selection, Selection) and selection.criterion == criterion
        assert selection.keep == sorted(set(selection.keep)) and len(selection.keep) == num_keep
        assert all(0 <= b < DEPTH for b in selection.keep)
        assert selection.scores.shape == (DEPTH,) and torch.isfinite(selection.scores).all()
        assert not selection.scores.requires_grad


def test_requests_are_checked_in_one_line(dit, digits):
    cases = [({"criterion": "magnitude", "num_keep": 3}, "choices: \\['random'"),
             ({"criterion": "laptop", "num_keep": 0}, "out of range"),
             ({"criterion": "laptop", "num_keep": DEPTH + 1}, "out of range"),
             ({"criterion": "amber", "num_keep": 3, "solver": "dp"}, "unknown option"),
             ({"criterion": "amber", "num_keep": 3, "aggregate": "median"}, "choices"),
             ({"criterion": "amber", "num_keep": 1, "protect": 1}, "lower protect")]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            select_blocks(dit, FlowMatching(), *digits, **kwargs)
        assert "\n" not in str(error.value)


def test_baselines_and_determinism(dit, digits):
    def run(criterion: str, **options) -> Selection:
        return select_blocks(dit, FlowMatching(), *digits, criterion, 4, **options)

    assert run("first").keep == [0, 1, 2, 3] and run("last").keep == [2, 3, 4, 5]
    assert run("random", seed=1).keep == run("random", seed=1).keep
    assert len({tuple(run("random", seed=s).keep) for s in range(6)}) > 1
    assert torch.equal(run("amber", seed=3).scores, run("amber", seed=3).scores)


def test_mode_is_restored_and_no_gradients_flow(digits, toy_dit):
    network = toy_dit()
    network.train()
    select_blocks(network, GaussianDiffusion(), *digits, "laptop", 3)
    assert network.training and all(p.grad is None for p in network.parameters())
    network.eval()
    select_blocks(network, GaussianDiffusion(), *digits, "ppcl", 3)
    assert not network.training


def test_calibration_spreads_times_over_each_objective(digits):
    images, labels = digits
    gaussian = calibration_set(GaussianDiffusion(), images, labels, num_timesteps=8, seed=0)
    assert gaussian.times.tolist() == [62, 187, 312, 437, 562, 687, 812, 937]
    assert torch.equal(gaussian.t, gaussian.times[gaussian.bins].float())
    assert torch.bincount(gaussian.bins).tolist() == [8] * 8
    flow = calibration_set(FlowMatching(), images, labels, num_timesteps=4, seed=0)
    assert torch.allclose(flow.times, torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert torch.equal(flow.x, calibration_set(FlowMatching(), images, labels, 4, seed=0).x)
    assert not torch.equal(flow.x, calibration_set(FlowMatching(), images, labels, 4, seed=1).x)
    with pytest.raises(ValueError, match="num_timesteps"):
        calibration_set(FlowMatching(), images[:3], labels[:3], num_timesteps=4)


def test_laptop_drops_the_identity_blocks_and_solvers_agree(dit, digits):
    selection = select_blocks(dit, GaussianDiffusion(), *digits, "laptop", DEPTH - 2)
    costs = selection.table["costs"]
    assert costs[list(IDENTITY)].abs().max() == 0 and costs.min() == 0
    assert (costs[[b for b in range(DEPTH) if b not in IDENTITY]] > 1e-6).all()
    assert selection.table["dropped"] == list(IDENTITY) and selection.table["dropped_cost"] == 0
    greedy = select_blocks(dit, GaussianDiffusion(), *digits, "laptop", DEPTH - 2, solver="greedy")
    assert greedy.keep == selection.keep
    dropped_three = select_blocks(dit, GaussianDiffusion(), *digits, "laptop", DEPTH - 3).table["dropped"]
    assert set(IDENTITY) < set(dropped_three) and costs[dropped_three].sum() == costs.sort().values[:3].sum()


def test_ppcl_collapses_the_identity_blocks(dit, digits):
    one = select_blocks(dit, FlowMatching(), *digits, "ppcl", DEPTH - 1)
    assert [(i["start"], i["end"]) for i in one.table["intervals"]] == [IDENTITY]
    assert one.keep == [0, 1, 2, 4, 5]  # the middle block of [2, 3] stands in for the interval
    assert one.table["S"][IDENTITY[0], 1] == pytest.approx(1.0, abs=1e-9)
    assert one.scores[list(IDENTITY)].max() < 1e-9 < one.scores[[0, 1, 4, 5]].min()
    two = select_blocks(dit, FlowMatching(), *digits, "ppcl", DEPTH - 2)
    covered = {b for i in two.table["intervals"] for b in range(i["start"], i["end"] + 1)}
    assert set(IDENTITY) <= covered and len(two.keep) == DEPTH - 2
    cheapest = select_blocks(
        dit, FlowMatching(), *digits, "ppcl", DEPTH - 2, order="cost", representative="end"
    )
    first = cheapest.table["intervals"]
    assert (IDENTITY[0], IDENTITY[1], IDENTITY[1]) in {(i["start"], i["end"], i["keep"]) for i in first}
    assert IDENTITY[0] not in cheapest.keep and IDENTITY[1] in cheapest.keep


def high_noise_forward(
    x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, skip: tuple[int, ...]
) -> torch.Tensor:
    """Two synthetic blocks: block 0 acts strongly but only for t > 0.875, block 1 a little at every t."""
    out = x.clone()
    if 0 not in skip:
        out = out + 2.0 * x * (t > 0.875).float().view(-1, 1, 1, 1)
    if 1 not in skip:
        out = out + 0.5 * x
    return out


def test_amber_max_keeps_a_block_that_matters_only_at_high_noise(digits):
    calibration = calibration_set(FlowMatching(), *digits, num_timesteps=8, seed=0)
    per_bin = amber_importance(high_noise_forward, calibration, depth=2)
    assert per_bin.shape == (2, 8) and per_bin[0, :7].abs().max() == 0 and per_bin[0, 7] > 0.3
    assert per_bin[1].min() > 0
    assert rank_keep(aggregate_bins(per_bin, "max"), 1) == [0]
    assert rank_keep(aggregate_bins(per_bin, "mean"), 1) == [1]  # mean aggregation misses it
    assert rank_keep(aggregate_bins(per_bin, "quantile", 0.95), 1) == [0]


def test_amber_on_a_dit_drops_identity_blocks_and_protects_the_ends(dit, digits):
    selection = select_blocks(dit, FlowMatching(), *digits, "amber", 2, num_timesteps=4)
    assert selection.table["per_bin"].shape == (DEPTH, 4) and selection.scores[list(IDENTITY)].max() == 0
    assert not set(selection.keep) & set(IDENTITY)
    protected = select_blocks(dit, FlowMatching(), *digits, "amber", 3, num_timesteps=4, protect=1)
    assert {0, DEPTH - 1} <= set(protected.keep)


def additive_forward(x, t, y, skip):
    """Six blocks acting on disjoint pixel rows: removal losses add exactly."""
    out = x.clone()
    for block in range(6):
        if block not in skip:
            out[..., block, :] += (block + 1) * 0.3 * x[..., block, :]
    return out


def redundant_forward(x, t, y, skip):
    """Pairs (0, 1), (2, 3), (4, 5) back each other up (one of a pair alone does the job), plus a small
    additive effect per block on its own pixels."""
    out = x.clone()
    for pair in range(3):
        if not {2 * pair, 2 * pair + 1} <= set(skip):
            out[..., pair, :] += x[..., pair, :]
    for block in range(6):
        if block not in skip:
            out[..., 4:, block] += 0.05 * (block + 1) * x[..., 4:, block]
    return out


def test_additivity_diagnostic_separates_additive_from_interacting_blocks(digits):
    calibration = calibration_set(FlowMatching(), *digits, num_timesteps=4, seed=0)
    exact = additivity(additive_forward, calibration, 6, num_sets=30)
    assert len(exact["sets"]) == 30 and len({tuple(s) for s in exact["sets"]}) == 30
    assert {len(s) for s in exact["sets"]} == {2, 3}
    assert torch.allclose(torch.tensor(exact["measured"]), torch.tensor(exact["predicted"]), rtol=1e-4)
    assert exact["pearson"] > 0.9999 and exact["spearman"] > 0.9999
    interacting = additivity(redundant_forward, calibration, 6, num_sets=30)
    assert interacting["pearson"] < 0.5


def test_additivity_is_high_on_near_identity_dit_blocks(digits, toy_dit):
    report = additivity_diagnostic(
        toy_dit(depth=8, identity=(), scale=0.02), FlowMatching(), *digits, num_sets=50
    )
    assert len(report["sets"]) == 50 and report["pearson"] > 0.7 and report["spearman"] > 0.7


def test_table_and_plot(dit, digits, tmp_path):
    selections = [select_blocks(dit, FlowMatching(), *digits, c, 3) for c in ("first", "amber")]
    table = importance_table(selections)
    lines = table.strip().splitlines()
    assert lines[0] == "| block | first | amber |" and len(lines) == 2 + DEPTH + 1
    assert (
        lines[2].startswith("| 0 | **1** |")
        and lines[-1] == "| kept | 0,1,2 | " + ",".join(map(str, selections[1].keep)) + " |"
    )
    plot_importance(selections, tmp_path / "importance.png")
    assert (tmp_path / "importance.png").stat().st_size > 1000


def write_checkpoint(path: Path, network: DiT, kind: str = "flow") -> Path:
    """A checkpoint in the layout ``ditlab.checkpoint`` reads (raw weights zeroed, so only EMA works)."""
    weights = network.state_dict()
    state_dict = {f"ema.{k}": v for k, v in weights.items()} | {
        f"network.{k}": torch.zeros_like(v) for k, v in weights.items()
    }
    meta = {"dit_config": network.config.to_dict(), "objective": asdict(ObjectiveConfig(kind=kind)),
            "sampling": asdict(SamplingConfig()), "vae": None, "latent_scale": 0.18215}  # fmt: skip
    torch.save({"state_dict": state_dict, "ditlab": meta}, path)
    return path


def test_analyze_tool_writes_json_table_and_plot(tmp_path, capsys, toy_dit):
    ckpt = write_checkpoint(tmp_path / "toy.ckpt", toy_dit(identity=(1,)))
    out = tmp_path / "analysis"
    argv = ["--ckpt", str(ckpt), "--criteria", "laptop,amber,ppcl,first", "--keep", "5", "--num-images", "48",
            "--num-timesteps", "4", "--additivity", "5", "--out", str(out)]  # fmt: skip
    assert analyze_main(argv) == 0
    report = json.loads((out / "analysis.json").read_text())
    assert report["depth"] == DEPTH and report["num_keep"] == 5 and report["objective"] == "flow"
    assert list(report["criteria"]) == ["laptop", "amber", "ppcl", "first"]
    for name in ("laptop", "amber"):
        assert report["criteria"][name]["keep"] == [0, 2, 3, 4, 5]
    (interval,) = report["criteria"]["ppcl"]["table"]["intervals"]  # PPCL merges block 1 into a neighbour
    assert interval["start"] <= 1 <= interval["end"] and interval["end"] - interval["start"] == 1
    assert len(report["criteria"]["amber"]["table"]["per_bin"]) == DEPTH
    assert report["criteria"]["ppcl"]["table"]["S"][-1][-1] is None  # NaN (no such span) becomes null
    assert len(report["criteria"]["laptop"]["table"]["additivity"]["sets"]) == 5
    assert (out / "importance.md").read_text().count("\n| ") >= DEPTH and (out / "importance.png").exists()
    assert "| kept |" in capsys.readouterr().out


def test_analyze_errors_are_one_line(tmp_path, capsys, toy_dit):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analyze_main(["--ckpt", str(tmp_path / "missing.ckpt")])
    ckpt = write_checkpoint(tmp_path / "toy.ckpt", toy_dit())
    with pytest.raises(ValueError, match="choices"):
        analyze_main(["--ckpt", str(ckpt), "--criteria", "laptop,bogus"])
    assert cli_main(["analyze", "--ckpt", str(ckpt), "--keep", "9"]) == 2
    assert "ditlab: error: cannot keep 9 blocks of a network of depth 6" in capsys.readouterr().err
    latent = DiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10
    )
    with pytest.raises(ValueError, match="datamodule"):
        analyze_main(
            ["--ckpt", str(write_checkpoint(tmp_path / "latent.ckpt", latent)), "--out", str(tmp_path)]
        )


@pytest.mark.slow
def test_analyze_a_checkpoint_from_a_tiny_fit(tiny_args, tmp_path):
    assert cli_main(["fit", *tiny_args, "--trainer.max_steps", "2", "--data.init_args.image_size", "8",
                     "--model.init_args.network.patch_size", "2"]) == 0  # fmt: skip
    ckpt = next(Path(tmp_path / "runs").rglob("last.ckpt"))
    assert (
        analyze_main(["--ckpt", str(ckpt), "--keep", "1", "--num-images", "32", "--num-timesteps", "2"]) == 0
    )
    report = json.loads((ckpt.parent.parent / "analysis" / "analysis.json").read_text())
    assert report["depth"] == 2 and all(len(c["keep"]) == 1 for c in report["criteria"].values())


def test_laptop_falls_back_to_iterative_removal_when_additivity_is_poor(dit, digits):
    from ditlab.methods.compress.analysis import iterative_removal, network_forward

    one_shot = select_blocks(dit, FlowMatching(), *digits, "laptop", 3, additivity_sets=10)
    assert "fallback" not in one_shot.table and one_shot.table["used_solver"] == "dp"
    strict = select_blocks(dit, FlowMatching(), *digits, "laptop", 3, additivity_sets=10, min_spearman=1.01)
    assert "iterative" in strict.table["fallback"] and strict.table["used_solver"] == "iterative"
    direct = select_blocks(dit, FlowMatching(), *digits, "laptop", 3, solver="iterative")
    assert direct.keep == strict.keep
    path = direct.table["removal_path"]
    assert len(path) == 3 and path == sorted(path)  # each further removal costs at least as much here
    assert set(IDENTITY) <= set(direct.table["dropped"])  # exact skips cost nothing, so they go first
    with calibrated(dit, digits) as calibration:
        dropped, _ = iterative_removal(network_forward(dit), calibration, DEPTH, 2)
    assert sorted(dropped) == sorted(IDENTITY)


def calibrated(dit, digits):
    from ditlab.methods.compress.analysis import _calibrated

    return _calibrated(dit, FlowMatching(), *digits, 8, 0)
