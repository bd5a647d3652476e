"""The benches' own arithmetic on constructed inputs whose answers are known: the alignment bench's paired
speed-up per seed, and the board's reading of a composition file (cached rows, an ``A+B`` training composition,
a refused cache)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_paired_speedup_reads_each_seed_against_its_own_vanilla():
    align = load("align")
    vanilla = {"final_fid": 2.0, "curve": [[1000, 10.0], [2000, 4.0], [3000, 2.5], [4000, 2.0]]}
    faster = {"curve": [[1000, 8.0], [2000, 2.0], [3000, 1.8], [4000, 1.7]]}  # reaches 2.0 at step 2000
    between = {"curve": [[1000, 9.0], [2000, 3.0], [3000, 1.0], [4000, 1.0]]}  # 3.0 -> 1.0: 2.0 at step 2500
    never = {"curve": [[1000, 9.0], [2000, 5.0], [3000, 3.0], [4000, 2.1]]}
    assert align.paired_speedup(faster, vanilla) == pytest.approx(2.0)
    assert align.paired_speedup(between, vanilla) == pytest.approx(4000 / 2500)
    assert align.paired_speedup(never, vanilla) is None
    assert align.paired_speedup(vanilla, vanilla) == pytest.approx(1.0)


def test_board_reads_cached_rows_training_compositions_and_refusals():
    board = load("board")
    board.SKIPPED.clear()
    summary = [
        {"model": "teacher", "cache": "none", "fid": 10.0, "flop_speedup": 1.0, "wall_speedup": 1.0},
        {"model": "teacher", "cache": "fora", "fid": 10.5, "flop_speedup": 1.8, "wall_speedup": 1.7},
        {"model": "dicomp", "cache": "none", "fid": 9.0, "flop_speedup": 2.0, "wall_speedup": 2.1},
        {"model": "dicomp", "cache": "fora", "fid": 9.5, "flop_speedup": 3.6, "wall_speedup": 3.3,
         "expected_flop_speedup": 3.6, "multiplies": True},
        {"model": "repa+dicomp", "cache": "none", "fid": 8.0, "flop_speedup": 2.0, "wall_speedup": 2.0},
        {"model": "repa+dicomp", "cache": "fora", "fid": 8.4, "flop_speedup": 2.5, "wall_speedup": 2.4,
         "expected_flop_speedup": 3.6, "multiplies": False},
        {"model": "dydit", "cache": "none", "fid": 9.9, "flop_speedup": 1.8, "wall_speedup": 1.8},
        {"model": "dydit", "cache": "fora", "refused": "the fora cache cannot follow the dydit trunk"},
    ]  # fmt: skip
    data = {"summary": summary, "args": {"threads": 2, "num": 2000}, "load_average_start": 0.4}
    rows = board.compose(data, "compose.json", "composition")
    assert [r["setting"] for r in rows] == ["dicomp + fora", "repa+dicomp", "repa+dicomp + fora"]
    by = {r["setting"]: r for r in rows}
    assert by["dicomp + fora"]["fid_rel"] == pytest.approx(0.95) and "savings multiply" in by["dicomp + fora"]["notes"]
    assert "FID 8.00 vs 9.00 for dicomp of the plain teacher" in by["repa+dicomp"]["notes"]
    assert "do not multiply" in by["repa+dicomp + fora"]["notes"]
    assert all(r["protocol_v2"] == "yes" for r in rows)  # load 0.4 and 2,000 samples
    assert any("dydit + fora" in s and "refused" in s for s in board.SKIPPED)


def test_levels_table_finds_an_arm_that_runs_twice_as_fast():
    align = load("align")
    steps = list(range(500, 8001, 500))
    fid = {s: 100.0 / s for s in range(250, 8001, 250)}  # vanilla's FID falls as 100 / step
    vanilla = {"arm": "vanilla", "seed": 0, "variant": {}, "steps": 8000, "curve": [[s, fid[s]] for s in steps]}
    twice = {"arm": "repa", "seed": 0, "variant": {}, "steps": 8000, "curve": [[s, 50.0 / s] for s in steps]}
    half = {"arm": "haste", "seed": 0, "variant": {}, "steps": 8000, "curve": [[s, 200.0 / s] for s in steps]}
    table = align.levels_table([vanilla, twice, half], {0})
    header, _, repa, haste = table.splitlines()
    assert "step 2000" in header and "step 8000" in header
    assert repa.split("|")[2:-1] == [" 2.00x "] * 4
    assert haste.split("|")[2:-1] == [" 0.50x ", " 0.50x ", " never ", " never "]  # it ends at vanilla's step-4000 FID


def test_alignment_final_table_lists_each_run_with_its_interval_and_text_metrics():
    align = load("align")
    final = {"fid": 20.0, "fid_interval": [18.5, 21.0], "num_samples": 2000, "clip_score": 55.25,
             "compositional_digit": 0.2, "compositional_accuracy": 0.03}  # fmt: skip
    rows = [{"arm": arm, "base_arm": arm, "seed": seed, "variant": {}, "steps": 4000, "final": dict(final, fid=fid)}
            for arm, seed, fid in (("repa", 1, 19.0), ("vanilla", 0, 20.0), ("repa", 0, 18.0), ("vanilla", 9, 1.0))]
    lines = align.final_table(rows, {0, 1}).splitlines()
    assert "2000 samples (step 4000)" in lines[0]
    runs = [line.split(" | ")[:3] for line in lines[4:]]
    assert runs == [["| vanilla", "0", "20.00 (18.50-21.00)"], ["| repa", "0", "18.00 (18.50-21.00)"],
                    ["| repa", "1", "19.00 (18.50-21.00)"]]  # vanilla first, seed 9 not reported
    assert lines[4].endswith("| 55.250 | 0.200 | 0.030 |")
    assert align.final_table([dict(r, final=None) for r in rows], {0, 1}) == ""


def test_board_reads_the_scenes_alignment_file_from_its_final_evaluations():
    board = load("board")
    final = lambda fid, clip, digit: {"fid": fid, "clip_score": clip, "compositional_digit": digit}  # noqa: E731
    rows = [{"arm": arm, "base_arm": arm, "seed": seed, "variant": {}, "final": final(fid, clip, digit),
             "curve": [[2000, 10.0], [4000, 9.8]]}
            for arm, seed, fid, clip, digit in (("vanilla", 0, 20.0, 50.0, 0.1), ("vanilla", 1, 22.0, 52.0, 0.3),
                                                ("repa", 0, 18.0, 54.0, 0.2), ("repa", 1, 19.0, 56.0, 0.4),
                                                ("repa", 100, 1.0, 99.0, 1.0))]  # fmt: skip
    data = {"rows": rows, "summary": {"repa": {"paired_speedup": {"0": 2.0, "1": None}}},
            "runs": [{"settings": {"part": "main", "seeds": [0, 1], "steps": 4000, "samples": 500, "every": 500,
                                   "final_samples": 2000},
                      "machine": {"loadavg_start": [0.9, 1.0, 1.1], "threads": 2}}]}  # fmt: skip
    (row,) = board.scenes_align(data, "align_scenes.json", "alignment")
    assert row["fid"] == pytest.approx(18.5) and row["baseline_fid"] == pytest.approx(21.0)
    assert row["clip_score"] == pytest.approx(55.0) and row["baseline_clip_score"] == pytest.approx(51.0)
    assert row["digit_check"] == pytest.approx(0.3) and row["baseline_digit_check"] == pytest.approx(0.2)
    assert row["steps_speedup"] == pytest.approx(1.0)  # (2.0 + never = 0) / 2
    assert row["samples"] == 2000 and row["seeds"] == 2 and row["protocol_v2"] == "yes"
    for r in rows:  # vanilla still falling 30% over its last interval: the horizon was too short for protocol v2
        r["curve"] = [[2000, 10.0], [4000, 7.0]]
    (row,) = board.scenes_align(data, "align_scenes.json", "alignment")
    assert row["protocol_v2"] == "no (vanilla still improving: FID -30% over its last interval)"


def test_runs_chained_in_one_bench_process_inherit_its_start_load():
    """The backbones bench runs its arms one after another; only the first run's start load says whether another
    job shared the machine. A run started by something else (its start load is not the previous end) counts alone."""
    board = load("board")

    def run(arm: str, seed: int, start: list, end: list, fid: float) -> dict:
        return {"arm": arm, "seed": seed, "steps": 100, "curve": [[50, fid + 10], [100, fid]], "final_fid": fid,
                "samples": 500, "parameters": 10, "threads": 2, "load_start": start, "load_end": end}  # fmt: skip

    chained = [run("sit", 0, [1.2, 1, 1], [2.0, 1, 1], 50.0), run("rae", 0, [2.0, 1, 1], [2.1, 1, 1], 30.0),
               run("sit", 1, [2.1, 1, 1], [2.0, 1, 1], 52.0), run("rae", 1, [2.0, 1, 1], [1.9, 1, 1], 31.0),
               run("sit", 2, [1.9, 1, 1], [2.0, 1, 1], 51.0), run("rae", 2, [2.0, 1, 1], [2.0, 1, 1], 29.0)]  # fmt: skip
    loads = board.chain_start_loads(chained)
    assert [loads[id(r)] for r in chained] == [1.2] * 6
    [row] = board.backbones({"train": chained}, "backbones.json", "backbones")
    assert row["setting"] == "rae" and row["protocol_v2"] == "yes"

    chained[3]["load_start"] = [6.5, 3, 2]  # seed 1's rae arm started by another process, beside other jobs
    loads = board.chain_start_loads(chained)
    assert [loads[id(r)] for r in chained] == [1.2, 1.2, 1.2, 6.5, 6.5, 6.5]
    [row] = board.backbones({"train": chained}, "backbones.json", "backbones")
    assert row["protocol_v2"] == "no (load 6.5)"


def test_board_reads_scene_caching_fids_when_the_file_has_them():
    board = load("board")
    base = {"row": "uncached", "method": "none", "settings": {}, "computed_share": 1.0, "images_per_s": 3.0,
            "clip_score": 90.0}  # fmt: skip
    cached = {"row": "caching", "method": "magcache", "settings": {"threshold": 0.06}, "computed_share": 0.5,
              "images_per_s": 6.0, "speedup": 2.0, "clip_score": 89.0, "psnr": 35.0}  # fmt: skip
    data = {"rows": [base, cached], "num": 2000, "threads": 2, "load_start": "1.10 1.00 0.90", "sampler": "euler",
            "steps": 50, "cfg_scale": 3.0, "block": "mmdit"}  # fmt: skip
    [old] = board.scenes_caching(data, "t2i_caching.json", "caching")
    assert old["fid"] is None and old["fid_rel"] is None and "no FID in the file" in old["notes"]
    assert old["protocol_v2"] == "yes"  # 2,000 samples, alone

    base.update(fid=4.0, fid_interval=[3.5, 4.4])
    cached.update(fid=5.0, fid_interval=[4.4, 5.5])
    [row] = board.scenes_caching(dict(data, fid_features="scene-clip-first"), "t2i_caching.json", "caching")
    assert (row["baseline_fid"], row["fid"], row["fid_interval"]) == (4.0, 5.0, [4.4, 5.5])
    assert row["fid_rel"] == pytest.approx(1.25) and "FID on scene-clip-first" in row["notes"]


def test_board_keeps_each_dense2moe_variant_apart_and_picks_the_smallest_within_reach():
    board = load("board")

    def row(method: str, seed: int, fid: float, active: float, steps: int = 300) -> dict:
        return {"method": method, "knob": {"experts": 7}, "seed": seed, "fid": fid, "train_steps": steps,
                "params_active": active, "params_total": 3.7e6, "flops_per_image": active * 20, "num_samples": 500}  # fmt: skip

    teacher = [row("dense teacher", s, 29.0 + s / 10, 3.65e6, steps=0) for s in range(3)]
    experts = [row("Dense2MoE: carve + KD (experts only)", s, 30.5, 2.68e6) for s in range(3)]
    mixture = [row("Dense2MoE: carve + KD + Mixture of Blocks", s, 28.0 + s, 2.03e6) for s in range(3)]
    run = {"settings": {"parts": ["dense2moe"], "seeds": [0, 1, 2], "distill_steps": 300},
           "machine": {"loadavg_start": [1.2, 1.0, 0.9], "threads": 2}}  # fmt: skip
    [moe_row] = board.moe({"rows": teacher + experts + mixture, "runs": [run]}, "moe.json", "MoE")
    assert moe_row["setting"] == "Dense2MoE: carve + KD + Mixture of Blocks (300 steps)" and moe_row["candidates"] == 2
    assert moe_row["fid"] == pytest.approx(29.0) and moe_row["param_ratio"] == pytest.approx(2.03 / 3.65)
    assert moe_row["protocol_v2"] == "yes"
