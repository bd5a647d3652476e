"""The board: every method family's best setting side by side, read only from ``bench/results/*.json``.

Two testbeds. Digits: the class-conditional 16x16 scikit-learn digits, FID on digits-classifier features (lower is
better). Digit scenes (text-to-image, 32x32, captions from a grammar): FID on the first recipe's scene CLIP
(``scene-clip-first``, a space no arm aligns to), CLIP score on the default scene CLIP and the scene recognizer's
digit check, from ``align_scenes.json`` (alignment) and ``t2i_caching.json`` (caches and learned routers on a T2I
teacher; that file holds no FID, so its rows show CLIP score and the paired PSNR).
Nothing is run: each results file is read, split into its baseline groups (one baseline FID each: a sampler and step
count, a teacher, a from-scratch twin at the same budget), and every group becomes one row. Missing files and keys
are skipped with a one-line note. Every number on the board is read from a file (or is a mean, sd or ratio of such
numbers); what a file does not hold is written "n/a".

Selection rule (one setting per row): among the family's own settings (references a file measures beside them are
not candidates: diffusers' hooks, FORA and the training-free rows copied into the learned-caching files, LAPTOP and
depth-pruned comparisons in ``moe.json`` / ``dynamic.json``, the fine-tuned teacher), keep those whose mean FID is
within 10% of the baseline's mean FID (FID / baseline <= 1.10), and pick the one with the largest saving: FLOPs
speed-up for sampling-time and compute methods (wall speed-up where no FLOPs are counted), the smallest (activated)
parameter ratio for size methods, the largest steps-to-baseline-FID speed-up for training-time methods; ties go to
the lower FID. If no setting is within 10%, the one with the lowest FID is shown. The notes column names the
lowest-FID setting when it is another one. Groups of a from-scratch comparison at several budgets show the longest.

Protocol v2: "yes" only when the run recorded a 1-minute load average at its start below 1.5 (the highest start
load over the runs that made the row's numbers) and it has >= 3 seeds or >= 2000 samples per FID; else "no" with
the reasons. Most early results ran on a shared 2-core machine at load 5-14 with 100-500 samples; the board says so.

    python bench/board.py [--results bench/results] [--out bench/results]

writes ``board.json`` (rows, files read, files missing), ``board.md`` (the table) and ``board.png`` (FID / baseline
against speed-up for sampling-time and compute methods, and against parameter ratio for size methods; hollow
markers: protocol v2 "no"; training-time rows are in the table only).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections.abc import Callable
from pathlib import Path

from ditlab.analysis import first_reach

RESULTS = Path(__file__).resolve().parent / "results"
WITHIN, LOAD_OK, SEEDS_OK, SAMPLES_OK = 1.10, 1.5, 3, 2000
WORDS = {"one": 1, "two": 2, "four": 4}
SKIPPED: list[str] = []


def skip(message: str) -> None:
    """Say on one line what the board leaves out, and keep it for board.{json,md}."""
    SKIPPED.append(message)
    print(f"[board] skipped: {message}")


# ----------------------------------------------------------------------------------------------- helpers
def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample sd (None for one value: no spread to report)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def start_load(value: object) -> float | None:
    """The 1-minute load average at the start, from any of the recorded shapes: "5.94 6.39 7.36", several processes
    joined by " / " (their maximum), [1, 5, 15] or [[start...], [end...]]."""
    if isinstance(value, str):
        firsts = [float(part.split()[0]) for part in value.split("/") if part.strip()]
        return max(firsts) if firsts else None
    if isinstance(value, list) and value:
        return start_load(value[0]) if isinstance(value[0], list) else float(value[0])
    return None


def threads_in(text: str) -> int | None:
    """A thread count written in prose ("1 thread", "one CPU thread")."""
    found = re.search(r"(\d+|one|two|four) (?:CPU |torch )?threads?", text)
    return None if found is None else int(WORDS.get(found.group(1), found.group(1)))


def protocol(loads: list[float | None], seeds: int, samples: int | None) -> str:
    """Protocol v2 verdict with the reasons it fails, so an old result is labelled rather than hidden."""
    why = []
    load = None if not loads or None in loads else max(loads)
    if load is None or load >= LOAD_OK:
        why.append("load n/a" if load is None else f"load {load:g}")
    if seeds < SEEDS_OK and (samples or 0) < SAMPLES_OK:
        why += [f"{'n/a' if samples is None else samples} samples", f"{seeds} seed{'s' if seeds > 1 else ''}"]
    return "yes" if not why else f"no ({' / '.join(why)})"


def still_improving(curves: list[list]) -> float | None:
    """Mean relative FID drop of the baseline's curves over their last evaluation interval when it exceeds 5%:
    the run stopped before the baseline converged, which protocol v2 asks of a training-time comparison."""
    drops = [1 - curve[-1][1] / curve[-2][1] for curve in curves if len(curve) > 1]
    drop = statistics.mean(drops) if drops else 0.0
    return drop if drop > 0.05 else None


def unconverged(row: dict, curves: list[list]) -> dict:
    """Mark a training-time row whose baseline was still improving at the end: protocol v2 'no', and why."""
    drop = still_improving(curves)
    if drop is None:
        return row
    why = f"vanilla still improving: FID -{drop:.0%} over its last interval"
    verdict = row["protocol_v2"]
    verdict = f"no ({why})" if verdict == "yes" else verdict[:-1] + f" / {why})"
    return {**row, "protocol_v2": verdict}


def cand(setting: str, fids: list[float], saving: str, **numbers: object) -> dict:
    """One setting a file holds: its per-seed FIDs, a saving in words and the numbers the rule and plot use."""
    return {"setting": setting, "fids": [f for f in fids if f is not None and math.isfinite(f)], "saving": saving,
            **numbers}  # fmt: skip


def saving_key(c: dict, kind: str) -> float:
    """The saving the selection rule maximises for this kind of method."""
    if kind == "training":
        return c.get("steps_speedup") or 0.0
    if kind == "size":
        return 1 / c["param_ratio"] if c.get("param_ratio") else 0.0
    return c.get("flop_speedup") or c.get("wall_speedup") or 0.0


def make_row(family: str, source: str, kind: str, baseline: str, base_fids: list[float], cands: list[dict],
             samples: int | None, loads: list[float | None], threads: set, notes: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """Apply the selection rule to one baseline group and lay out its board row."""
    cands = [c for c in cands if c["fids"]]
    if not cands or not base_fids:
        raise KeyError(f"{source}: no {'baseline' if not base_fids else 'candidate'} FID for {baseline}")
    base, base_sd = mean_sd(base_fids)
    for c in cands:
        c["mean"], c["sd"] = mean_sd(c["fids"])
    ok = [c for c in cands if c["mean"] / base <= WITHIN]
    best = max(ok, key=lambda c: (saving_key(c, kind), -c["mean"])) if ok else min(cands, key=lambda c: c["mean"])
    lowest = min(cands, key=lambda c: c["mean"])
    extra = [best["note"]] if best.get("note") else []
    if lowest is not best:
        extra.append(f"lowest FID: {lowest['setting']} {lowest['mean']:.2f} ({lowest['mean'] / base:.3f})")
    if not ok:
        extra.append("no setting within 10% of the baseline: lowest FID shown")
    seeds = len(best["fids"])
    return {"family": family, "file": source, "kind": kind, "setting": best["setting"], "baseline": baseline,
            "baseline_fid": base, "baseline_fid_sd": base_sd, "fid": best["mean"], "fid_sd": best["sd"],
            "fid_interval": best.get("fid_interval"), "fid_rel": best["mean"] / base, "saving": best["saving"],
            **{k: best.get(k) for k in ("flop_speedup", "wall_speedup", "param_ratio", "steps_speedup")},
            "samples": samples, "seeds": seeds, "load_start": loads, "threads": sorted(threads),
            "protocol_v2": protocol(loads, seeds, samples), "notes": "; ".join([*notes, *extra]),
            "candidates": len(cands)}  # fmt: skip


def knobs(values: dict) -> str:
    return " ".join(f"{k} {v}" for k, v in values.items())


# ----------------------------------------------------------------------------------------------- readers
def caching(data: dict, source: str, family: str, own: str = "ditlab") -> list[dict]:
    """Training-free (``own="ditlab"``) or learned (``own="learned"``) caches: one row per sampler step count."""
    steps_list = data["steps"] if isinstance(data["steps"], list) else [data["steps"]]
    threads = {data["threads"]} if "threads" in data else set()
    rows = []
    for steps in steps_list:
        mine = [r for r in data["rows"] if r.get("steps", steps) == steps]
        base = [r["fid"] for r in mine if r["policy"] == "none" and r["source"] == "ditlab"]
        cands = []
        for r in (r for r in mine if r["source"] == own and r["policy"] != "none" and r.get("fid") is not None):
            paired = [p for p in data.get("interleaved", []) if p.get("steps", steps) == steps
                      and p.get("source", own) == own and p["policy"] == r["policy"] and p["knobs"] == r["knobs"]]  # fmt: skip
            wall = paired[0]["wall_speedup"] if paired else None  # single-row wall times drift with the load
            timing = f"{wall:.2f}x wall (paired)" if wall else f"wall n/a paired (unpaired {r['wall_speedup']:.2f}x)"
            cands.append(cand(f"{r['policy']} {knobs(r['knobs'])}".strip(), [r["fid"]],
                              f"{r['flop_speedup']:.2f}x FLOPs, {timing}", flop_speedup=r["flop_speedup"],
                              wall_speedup=wall, fid_interval=r.get("fid_interval"),
                              note=f"PSNR {r['psnr']:.1f} dB vs uncached"))  # fmt: skip
        notes = (f"wall pairs at load {start_load(data['interleaved_load_start'])}",) if "interleaved_load_start" in data else ()
        rows.append(make_row(family, source, "sampling", f"uncached {data['sampler']} {steps} steps", base, cands,
                             data.get("num"), [start_load(data.get("load_start"))], threads, notes))  # fmt: skip
    return rows


def dicomp(data: dict, source: str, family: str) -> list[dict]:
    """Compressed students at ~half the teacher's parameters; the file counts no FLOPs."""
    settings, teacher = data["settings"], data["teacher_parameters"]
    cands = []
    for name in dict.fromkeys(s["row"] for s in data["students"]):
        mine = [s for s in data["students"] if s["row"] == name]
        ratio = statistics.mean(s["parameters"] for s in mine) / teacher
        cands.append(cand(name, [s["fid"] for s in mine], f"params {ratio:.3f} of {teacher / 1e6:.2f}M; FLOPs n/a",
                          param_ratio=ratio))  # fmt: skip
    threads = {settings["threads"]} if "threads" in settings else set()
    return [make_row(family, source, "size", f"teacher ({settings['steps']}-step students)", data["teacher_fid"],
                     cands, settings.get("samples"), [start_load(data.get("load"))], threads)]  # fmt: skip


def dynamic(data: dict, source: str, family: str) -> list[dict]:
    """DyDiT / Elastic-DiT / DC-DiT against the teacher; depth-pruned rows are references, not candidates."""
    rows, setup = data["rows"], data.get("setup", "")
    cands = []
    for name in dict.fromkeys(r["method"] for r in rows if r["method"] != "teacher" and not r["method"].startswith("depth")):
        mine = [r for r in rows if r["method"] == name]
        flops, wall = statistics.mean(r["flops_ratio"] for r in mine), statistics.mean(r["speedup"] for r in mine)
        cands.append(cand(name, [r["fid"] for r in mine], f"{1 / flops:.2f}x FLOPs ({flops:.3f}), {wall:.2f}x wall (paired)",
                          flop_speedup=1 / flops, wall_speedup=wall))  # fmt: skip
    samples = re.search(r"(\d+) samples", setup)
    threads = threads_in(setup)
    return [make_row(family, source, "compute", "teacher", [r["fid"] for r in rows if r["method"] == "teacher"], cands,
                     int(samples.group(1)) if samples else None, [start_load(data.get("load_start"))],
                     {threads} if threads else set(), ("4 processes side by side",) if "4 processes" in setup else ())]  # fmt: skip


def moe(data: dict, source: str, family: str) -> list[dict]:
    """Dense2MoE against its dense teacher, DiT-MoE against the dense DiT of equal activated size (longest budget)."""
    rows, runs = data["rows"], data.get("runs", [])

    def runs_of(r: dict) -> list[dict]:
        """The runs that made a row: its part, its seed, its budget (the teacher, 0 steps, is in any dense2moe run)."""
        part, budget = ("scratch", "scratch_steps") if "mlp" in r["knob"] else ("dense2moe", "distill_steps")
        return [run for run in runs if part in run["settings"]["parts"] and r["seed"] in run["settings"]["seeds"]
                and r["train_steps"] in (0, run["settings"][budget])]  # fmt: skip

    out = []
    for prefix, baseline in (("Dense2MoE", "dense teacher"), ("DiT-MoE", "dense DiT")):
        mine = [r for r in rows if r["method"].startswith(prefix)]
        if not mine:
            skip(f"{source}: no {prefix} rows")
            continue
        steps = max(r["train_steps"] for r in mine)
        mine = [r for r in mine if r["train_steps"] == steps]
        base = [r for r in rows if r["method"] == baseline and r["train_steps"] in (0, steps)]
        b, cands = base[0], []
        for method in dict.fromkeys(r["method"] for r in mine):  # each variant its own candidate (experts only, MoB)
            runs_of_method = [r for r in mine if r["method"] == method]
            first = runs_of_method[0]
            active, total = first["params_active"] / b["params_active"], first["params_total"] / b["params_total"]
            flops = first["flops_per_image"] / b["flops_per_image"]
            text = (f"active params {active:.3f} ({first['params_active'] / 1e6:.2f}M of {b['params_active'] / 1e6:.2f}M;"
                    f" total {total:.3f}x), FLOPs {flops:.3f} ({1 / flops:.2f}x)")  # fmt: skip
            cands.append(cand(f"{method} ({steps} steps)", [r["fid"] for r in runs_of_method], text,
                              param_ratio=active, flop_speedup=1 / flops))  # fmt: skip
        made = list({id(run): run for r in mine + base for run in runs_of(r)}.values())
        out.append(make_row(family, source, "size", f"{baseline} ({steps} steps)" if prefix == "DiT-MoE" else baseline,
                            [r["fid"] for r in base], cands,
                            mine[0].get("num_samples"), [run["machine"]["loadavg_start"][0] for run in made] or [None],
                            {run["machine"]["threads"] for run in made}))  # fmt: skip
    return out


def attention(data: dict, source: str, family: str) -> list[dict]:
    """Grafted attention operators on the 64-token teacher; the teacher's own fine-tune is a reference."""
    graft, protocol_ = data["graft"], data.get("graft_protocol", {})
    teacher = [r for r in graft if r["variant"] == "teacher"]
    flops0, attn0, params0 = (teacher[0][k] for k in ("flops_per_image", "attention_flops_per_image", "parameters"))
    cands = []
    for name in dict.fromkeys(r["variant"] for r in graft if not r["variant"].startswith("teacher")):
        mine = [r for r in graft if r["variant"] == name]
        speed = flops0 / statistics.mean(r["flops_per_image"] for r in mine)
        attn = statistics.mean(r["attention_flops_per_image"] for r in mine) / attn0
        params = statistics.mean(r["parameters"] for r in mine) / params0
        cands.append(cand(name, [r["fid"] for r in mine], f"{speed:.2f}x FLOPs (attention FLOPs {attn:.3f}), params "
                          f"{params:.3f}; wall n/a (unpaired only)", flop_speedup=speed, param_ratio=params))  # fmt: skip
    threads = threads_in(data.get("machine", ""))
    steps = protocol_.get("finetune_steps", "n/a")
    return [make_row(family, source, "compute", f"teacher ({steps}-step fine-tunes)", [r["fid"] for r in teacher],
                     cands, protocol_.get("samples", teacher[0].get("num_samples")),
                     [start_load(data.get("load_start"))], {threads} if threads else set())]  # fmt: skip


def paired_speedups(paired: dict) -> tuple[float, str]:
    """Mean and wording of per-seed speed-ups against vanilla of the same seed; a seed that never gets there counts
    as 0x."""
    speed = statistics.mean(v or 0.0 for v in paired.values())
    text = ("paired steps-to-vanilla's-final-FID speed-up per seed " +
            ", ".join(f"s{k}: " + ("never" if v is None else f"{v:.2f}x") for k, v in paired.items()) +
            f" (mean {speed:.2f}x, never = 0)")  # fmt: skip
    return speed, text


def align(data: dict, source: str, family: str) -> list[dict]:
    """Alignment arms against vanilla: steps to vanilla's final FID, from the file's own summary."""
    summary, main = data["summary"], next(run for run in data["runs"] if run["settings"]["part"] == "main")
    seeds = main["settings"]["seeds"]
    plain = [r for r in data["rows"] if r["arm"] == r["base_arm"] and not r["variant"] and r["seed"] in seeds]
    own = [s for s in summary["vanilla"]["steps_to_vanilla"] if s is not None]
    step_s = data.get("step_seconds", {})
    cands = []
    for arm in (a for a in summary if a not in ("vanilla", "vanilla_final_fid")):
        time = f"{step_s[arm] / step_s['vanilla']:.2f}x" if arm in step_s and "vanilla" in step_s else "n/a"
        paired = summary[arm].get("paired_speedup")
        if paired:
            speed, text = paired_speedups(paired)
        else:
            reach = [s for s in summary[arm]["steps_to_vanilla"] if s is not None]
            speed = statistics.mean(own) / statistics.mean(reach) if reach and own else None
            text = (f"vanilla's final FID at step {statistics.mean(reach):.0f} vs {statistics.mean(own):.0f} ({speed:.2f}x,"
                    f" {len(reach)}/{len(summary[arm]['steps_to_vanilla'])} seeds)" if speed else "never reaches vanilla's final FID")  # fmt: skip
        cands.append(cand(arm, [r["final_fid"] for r in plain if r["arm"] == arm], f"{text}; step time {time}",
                          steps_speedup=speed))  # fmt: skip
    row = make_row(family, source, "training", f"vanilla ({main['settings']['steps']} steps)",
                   [r["final_fid"] for r in plain if r["arm"] == "vanilla"], cands, main["settings"].get("samples"),
                   [main["machine"]["loadavg_start"][0]], {main["machine"]["threads"]})  # fmt: skip
    return [unconverged(row, [r["curve"] for r in plain if r["arm"] == "vanilla"])]


def chain_start_loads(runs: list[dict]) -> dict[int, float | None]:
    """Each run's start load, read as the load its bench process found: a run whose start load is exactly the
    previous run's end load was started by the same process right after it (the bench's own threads, not another
    job), so it inherits the first run of that chain's load."""
    loads, previous = {}, None
    for run in runs:
        chained = previous is not None and run.get("load_start") == previous.get("load_end")
        loads[id(run)] = loads[id(previous)] if chained else start_load(run.get("load_start"))
        previous = run
    return loads


BACKBONE_PAIRS = {"rae": "sit", "ofa-kd": "output-kd", "dico": "dit", "d2it": "dit"}


def backbones(data: dict, source: str, family: str) -> list[dict]:
    """Training curves (arm vs its pair, longest budget) and the speed groups (first row, or ``dit``, as baseline)."""
    out, train = [], data.get("train", [])
    chain_loads = chain_start_loads(train)
    for baseline in dict.fromkeys(BACKBONE_PAIRS.values()):
        arms = [a for a, b in BACKBONE_PAIRS.items() if b == baseline]
        budgets = {r["steps"] for r in train if r["arm"] in arms} & {r["steps"] for r in train if r["arm"] == baseline}
        if not budgets:
            skip(f"{source}: no {'/'.join(arms)} run at a budget {baseline} also ran")
            continue
        steps = max(budgets)
        base = [r for r in train if r["arm"] == baseline and r["steps"] == steps]
        level = statistics.mean(r["final_fid"] for r in base)
        own = [s for s in (first_reach(r["curve"], level) for r in base) if s is not None]
        cands, used = [], list(base)
        for arm in arms:
            mine = [r for r in train if r["arm"] == arm and r["steps"] == steps]
            used += mine
            reach = [s for s in (first_reach(r["curve"], level) for r in mine) if s is not None]
            speed = statistics.mean(own) / statistics.mean(reach) if reach and own else None
            params = statistics.mean(r["parameters"] for r in mine) / statistics.mean(r["parameters"] for r in base) if mine else None
            text = (f"{baseline}'s final FID at step {statistics.mean(reach):.0f} vs {statistics.mean(own):.0f} "
                    f"({speed:.2f}x, {len(reach)}/{len(mine)} seeds)" if speed else f"never reaches {baseline}'s final FID")  # fmt: skip
            cands.append(cand(arm, [r["final_fid"] for r in mine],
                              f"{text}; params {params:.3f}" if params else text, steps_speedup=speed))  # fmt: skip
        if any(c["fids"] for c in cands):
            out.append(make_row(family, source, "training", f"{baseline} ({steps} steps)", [r["final_fid"] for r in base],
                                cands, base[0].get("samples"), [chain_loads[id(r)] for r in used],
                                {r["threads"] for r in used if "threads" in r}))  # fmt: skip
    for group, rows in data.get("speed", {}).items():
        base = next((r for r in rows if r["name"] == "dit"), rows[0])
        cands = []
        for r in (r for r in rows if r is not base):
            flops, wall, params = (base["flops_per_image"] / r["flops_per_image"], r["images_per_s"] / base["images_per_s"],
                                   r["parameters"] / base["parameters"])  # fmt: skip
            cands.append(cand(f"{r['name']} ({r['block']} / {r['trunk']})", [r["fid"]], f"{flops:.2f}x FLOPs, {wall:.2f}x wall"
                              f" (rotating rounds), params {params:.3f}", flop_speedup=flops, wall_speedup=wall,
                              param_ratio=params, fid_interval=r.get("fid_interval")))  # fmt: skip
        if not cands:
            skip(f"{source} [{group}]: no checkpoint beside the baseline {base['name']}")
        else:
            out.append(make_row(family, f"{source} [{group}]", "compute", f"{base['name']}", [base["fid"]], cands,
                                base.get("num"), [start_load(r.get("load_start")) for r in rows],
                                {r["threads"] for r in rows if "threads" in r}))  # fmt: skip
    return out


def compose(data: dict, source: str, family: str) -> list[dict]:
    """``bench/compose.py``: each method model sampled with the cache, against the uncached teacher, one row per
    composition; the notes say whether the FLOPs savings multiply. A refused composition is named in "skipped"."""
    summary = data["summary"]
    teacher = next(r for r in summary if r["model"] == "teacher" and r["cache"] == "none")
    threads = {data["args"]["threads"]} if "threads" in data.get("args", {}) else set()
    out = []
    uncached = {r["model"]: r for r in summary if r["cache"] == "none" and "fid" in r}

    def row(r: dict, label: str, note: str) -> dict:
        cands = [cand(label, [r["fid"]], f"{r['flop_speedup']:.2f}x FLOPs, {r['wall_speedup']:.2f}x wall (paired)",
                      flop_speedup=r["flop_speedup"], wall_speedup=r["wall_speedup"], fid_interval=r.get("fid_interval"),
                      note=note)]  # fmt: skip
        return make_row(family, f"{source} [{label}]", "compute", "teacher, uncached", [teacher["fid"]], cands,
                        data.get("args", {}).get("num"), [data.get("load_average_start")], threads)  # fmt: skip

    for r in summary:
        if r["model"] == "teacher" or (r["cache"] == "none" and "+" not in r["model"]):
            continue
        if "refused" in r:
            skip(f"{source} [{r['model']} + {r['cache']}]: refused: {r['refused']}")
        elif r["cache"] == "none":  # "A+B": method B applied to a model trained with A, beside B of the plain teacher
            base = uncached.get(r["model"].split("+")[-1])
            out.append(row(r, r["model"], f"FID {r['fid']:.2f} vs {base['fid']:.2f} for {base['model']} of the plain "
                                          "teacher" if base else ""))  # fmt: skip
        else:
            verdict = "savings multiply" if r.get("multiplies") else "savings do not multiply"
            note = f"{verdict} (expected {r['expected_flop_speedup']:.2f}x)" if "expected_flop_speedup" in r else ""
            out.append(row(r, f"{r['model']} + {r['cache']}", note))
    return out


FILES: list[tuple[str, str, Callable[[dict, str, str], list[dict]]]] = [
    ("caching", "caching.json", caching), ("caching", "caching_sit.json", caching),
    *(("learned caching", name, lambda d, s, f: caching(d, s, f, own="learned"))
      for name in ("learned_caching.json", "learned_caching_long.json")),
    ("compression", "dicomp.json", dicomp), ("compression", "dicomp.ppcl_magnitude_400.json", dicomp),
    ("dynamic compute", "dynamic.json", dynamic), ("MoE", "moe.json", moe),
    ("attention / grafting", "attention.json", attention), ("attention / grafting", "attention_kv/attention.json", attention),
    ("alignment", "align.json", align), ("backbones", "backbones.json", backbones),
    ("composition", "compose.json", compose),
]  # fmt: skip


# ----------------------------------------------------------------------------------------------- digit scenes
def scenes_align(data: dict, source: str, family: str) -> list[dict]:
    """Alignment arms on the digit scenes against vanilla: the final evaluation's FID (scene-clip-first features,
    which no arm aligns to), CLIP score and digit check; steps to vanilla's final FID from the file's summary."""
    main = next(run for run in data["runs"] if run["settings"]["part"] == "main")
    seeds = main["settings"]["seeds"]
    plain = [r for r in data["rows"] if r["arm"] == r["base_arm"] and not r["variant"] and r["seed"] in seeds
             and r.get("final")]  # fmt: skip
    finals = {arm: [r["final"] for r in plain if r["arm"] == arm] for arm in dict.fromkeys(r["arm"] for r in plain)}
    mean = lambda arm, key: statistics.mean(f[key] for f in finals[arm]) if all(key in f for f in finals[arm]) else None  # noqa: E731
    rows = []
    for arm in (a for a in finals if a != "vanilla"):
        speed, text = paired_speedups(data["summary"][arm]["paired_speedup"])
        one = cand(arm, [f["fid"] for f in finals[arm]], text, steps_speedup=speed)
        row = make_row(family, source, "training", f"vanilla ({main['settings']['steps']} steps)",
                       [f["fid"] for f in finals["vanilla"]], [one], main["settings"].get("final_samples"),
                       [main["machine"]["loadavg_start"][0]], {main["machine"]["threads"]},
                       ("steps to vanilla's FID read on the tracking curve "
                        f"({main['settings']['samples']} samples every {main['settings']['every']} steps)",))  # fmt: skip
        row = unconverged(row, [r["curve"] for r in data["rows"] if r in plain and r["arm"] == "vanilla"])
        rows.append({**row, "clip_score": mean(arm, "clip_score"), "digit_check": mean(arm, "compositional_digit"),
                     "baseline_clip_score": mean("vanilla", "clip_score"),
                     "baseline_digit_check": mean("vanilla", "compositional_digit")})  # fmt: skip
    return rows


def scenes_caching(data: dict, source: str, family: str) -> list[dict]:
    """Caches and learned routers on a text-to-image teacher: speed-up, CLIP score against the uncached run, PSNR
    against its samples, and FID where the file measured one (files before 2026-12-08 hold none)."""
    base = next(r for r in data["rows"] if r["method"] == "none")
    base_fid = base.get("fid")
    rows = []
    for r in (r for r in data["rows"] if r["method"] != "none"):
        seeds, samples = 1, data.get("num")
        fid = r.get("fid") if base_fid else None
        fid_note = f"FID on {data['fid_features']}" if fid is not None else "no FID in the file"
        rows.append({"family": "learned caching" if r["row"] == "learned router" else family, "file": source,
                     "kind": "sampling", "setting": f"{r['method']} {knobs(r['settings'])}", "baseline":
                     f"uncached {data['sampler']} {data['steps']} steps, CFG {data['cfg_scale']}",
                     "baseline_fid": base_fid, "baseline_fid_sd": None, "fid": fid, "fid_sd": None,
                     "fid_interval": r.get("fid_interval") if fid is not None else None,
                     "fid_rel": None if fid is None else fid / base_fid, "clip_score": r["clip_score"], "baseline_clip_score": base["clip_score"],
                     "digit_check": None, "baseline_digit_check": None, "wall_speedup": r["speedup"],
                     "flop_speedup": None, "param_ratio": None, "steps_speedup": None,
                     "saving": f"{r['speedup']:.2f}x images/s (paired), {r['computed_share']:.0%} of units computed",
                     "samples": samples, "seeds": seeds, "load_start": [start_load(data.get("load_start"))],
                     "threads": [data["threads"]], "protocol_v2": protocol([start_load(data.get("load_start"))], seeds, samples),
                     "notes": f"PSNR {r['psnr']:.1f} dB vs uncached; {data['block']} teacher; {fid_note}"})  # fmt: skip
    return rows


SCENES_FILES: list[tuple[str, str, Callable[[dict, str, str], list[dict]]]] = [
    ("alignment", "align_scenes.json", scenes_align), ("caching", "t2i_caching.json", scenes_caching),
]


# ----------------------------------------------------------------------------------------------- outputs
def fmt(value: float | None, sd: float | None = None, interval: list | None = None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.2f}" + ("" if sd is None else f" ± {sd:.2f}")
    return text + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def markdown(board: dict) -> str:
    """The table, with the columns and the protocol-v2 rule spelled out above it."""
    lines = ["# Board: each family's best setting", "", "## Digits (class-conditional)", "",
             "Columns: the results file and its baseline group; the setting the selection rule picks (the fastest / "
             "smallest / fewest-steps setting within 10% of the baseline's FID, else the lowest FID); the baseline's "
             "FID and the setting's (mean ± sample sd over seeds, recomputed from the per-seed FIDs, so it can differ "
             "from a file's own table where that used the population sd; [95% interval] where the file has one); FID / "
             "baseline (< 1 is better); the saving as the file measures it (paired = interleaved timing; a wall time "
             "taken alone under a drifting load is not quoted as a speed-up); samples per FID; seeds (1 = a single "
             "run); the 1-minute load average at the start of the runs behind the row and their torch threads; "
             "protocol v2 = **yes** only with start load < 1.5 and >= 3 seeds or >= 2000 samples, else **no** with "
             "the reasons. Built by `python bench/board.py` from the JSON files only.", "",
             "| family | file | setting | baseline (FID) | FID | FID / baseline | saving | samples | seeds | load at "
             "start | threads | protocol v2 | notes |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in board["rows"]:
        load = " / ".join("n/a" if x is None else f"{x:g}" for x in dict.fromkeys(r["load_start"]))
        lines.append(f"| {r['family']} | {r['file']} | {r['setting']} | {r['baseline']} ({fmt(r['baseline_fid'], r['baseline_fid_sd'])})"
                     f" | {fmt(r['fid'], r['fid_sd'], r['fid_interval'])} | {r['fid_rel']:.3f} | {r['saving']} | "
                     f"{r['samples'] if r['samples'] is not None else 'n/a'} | {r['seeds']} | {load} | "
                     f"{', '.join(map(str, r['threads'])) or 'n/a'} | {r['protocol_v2']} | {r['notes']} |")  # fmt: skip
    if board.get("scenes"):
        lines += ["", "## Digit scenes (text-to-image)", "",
                  "FID on `scene-clip-first` features (the first recipe's scene CLIP, which no arm aligns to); CLIP "
                  "score on the default scene CLIP and the recognizer's digit check (share of prompted digits found), "
                  "each as the row's value (the baseline's); the same protocol-v2 rule.", "",
                  "| family | file | setting | baseline | FID (baseline) | FID / baseline | CLIP score (baseline) | digit "
                  "check (baseline) | saving | samples | seeds | load at start | threads | protocol v2 | notes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in board["scenes"]:
            load = " / ".join("n/a" if x is None else f"{x:g}" for x in dict.fromkeys(r["load_start"]))
            relative = "n/a" if r["fid_rel"] is None else f"{r['fid_rel']:.3f}"
            lines.append(f"| {r['family']} | {r['file']} | {r['setting']} | {r['baseline']} | "
                         f"{fmt(r['fid'], r['fid_sd'], r['fid_interval'])} ({fmt(r['baseline_fid'], r['baseline_fid_sd'])}) | "
                         f"{relative} | "
                         f"{fmt(r['clip_score'])} ({fmt(r['baseline_clip_score'])}) | {fmt(r['digit_check'])} "
                         f"({fmt(r['baseline_digit_check'])}) | {r['saving']} | {r['samples'] or 'n/a'} | {r['seeds']} | "
                         f"{load} | {', '.join(map(str, r['threads'])) or 'n/a'} | {r['protocol_v2']} | {r['notes']} |")  # fmt: skip
    lines += ["", f"Files read: {', '.join(board['files_read']) or 'none'}.",
              f"Missing or skipped: {'; '.join(board['skipped']) or 'none'}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, scenes: list[dict] = ()) -> None:
    """Two Pareto panels on digits and one on the digit scenes; hollow markers are rows that fail protocol v2."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(20, 6), layout="constrained")
    panels = figure.subplots(1, 3)
    families = list(dict.fromkeys([r["family"] for r in rows if r["kind"] != "training"] + [r["family"] for r in scenes]))
    colours = {f: f"C{i % 10}" for i, f in enumerate(families)}
    spec = [(panels[0], ("sampling", "compute"), lambda r: r["flop_speedup"] or r["wall_speedup"],
             "speed-up (FLOPs; wall where no FLOPs are counted)", "sampling-time and compute methods"),
            (panels[1], ("size",), lambda r: r["param_ratio"], "(activated) parameters / baseline's", "size methods")]  # fmt: skip
    for axis, kinds, x_of, xlabel, title in spec:
        for r in (r for r in rows if r["kind"] in kinds and x_of(r)):
            colour = colours[r["family"]]
            axis.scatter([x_of(r)], [r["fid_rel"]], s=60, edgecolors=colour, linewidths=1.5,
                         facecolors=colour if r["protocol_v2"] == "yes" else "none")  # fmt: skip
            axis.annotate(f"{r['setting'][:36]}\nvs {r['baseline']} ({Path(r['file']).stem})", (x_of(r), r["fid_rel"]),
                          fontsize=6.5, xytext=(5, -3), textcoords="offset points", va="center")  # fmt: skip
        axis.axhline(1.0, color="grey", lw=0.8)
        axis.axhline(WITHIN, color="grey", lw=0.8, ls="--")
        axis.margins(x=0.25, y=0.08)
        axis.set(xlabel=xlabel, ylabel="FID / baseline FID (lower is better; dashed: 1.10)", title=title)
    axis = panels[2]
    for r in (r for r in scenes if r.get("clip_score") and r.get("baseline_clip_score")):
        speed = r["steps_speedup"] if r["kind"] == "training" else r["wall_speedup"]
        colour, ratio = colours[r["family"]], r["clip_score"] / r["baseline_clip_score"]
        axis.scatter([speed], [ratio], s=60, edgecolors=colour, linewidths=1.5, marker="s" if r["kind"] == "training" else "o",
                     facecolors=colour if r["protocol_v2"] == "yes" else "none")  # fmt: skip
        axis.annotate(f"{r['setting'][:36]}\nvs {r['baseline']}", (speed, ratio), fontsize=6.5, xytext=(5, -3),
                      textcoords="offset points", va="center")  # fmt: skip
    axis.axhline(1.0, color="grey", lw=0.8)
    axis.axvline(1.0, color="grey", lw=0.8)
    axis.margins(x=0.25, y=0.08)
    axis.set(xlabel="speed-up (squares: training steps to vanilla's FID, never = 0; circles: images/s)", ylabel="CLIP score / baseline's (higher is better)",
             title="digit scenes (text-to-image)")  # fmt: skip
    handles = [Line2D([], [], marker="o", ls="", color=c, label=f) for f, c in colours.items()]
    handles += [Line2D([], [], marker="o", ls="", color="k", label="protocol v2: yes"),
                Line2D([], [], marker="o", ls="", color="k", markerfacecolor="none", label="protocol v2: no")]  # fmt: skip
    panels[1].legend(handles=handles, fontsize=7, loc="center right")
    figure.suptitle("Board: each family's best setting, digits (left, middle) and digit scenes (right) (hollow: protocol v2 'no' - start load >= 1.5, or < 3 "
                    "seeds and < 2000 samples); digits' training-time rows are in board.md only")  # fmt: skip
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the results JSON files")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for board.{json,md,png}")
    args = parser.parse_args()
    paragraphs = [" ".join(p.split()) for p in __doc__.split("\n\n")]
    board = {"rule": next(p for p in paragraphs if p.startswith("Selection rule")),
             "protocol_v2": next(p for p in paragraphs if p.startswith("Protocol v2")),
             "files_read": [], "files_missing": [], "skipped": SKIPPED, "rows": [], "scenes": []}  # fmt: skip
    for files, key, where in ((FILES, "rows", ""), (SCENES_FILES, "scenes", ", digit scenes")):
        for family, name, reader in files:
            path = args.results / name
            if not path.is_file():
                board["files_missing"].append(name)
                skip(f"{name} ({family}{where}): not found")
                continue
            board["files_read"].append(name)
            try:
                board[key] += reader(json.loads(path.read_text()), name, family)
            except (KeyError, StopIteration, TypeError, IndexError, ZeroDivisionError) as error:
                skip(f"{name} ({family}{where}): lacks what the board needs ({type(error).__name__}: {error})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "board.json").write_text(json.dumps(board, indent=1))
    (args.out / "board.md").write_text(markdown(board))
    plot(board["rows"], args.out / "board.png", board["scenes"])
    print(f"[board] {len(board['rows'])} rows from {len(board['files_read'])} files -> {args.out}/board.{{json,md,png}}")


if __name__ == "__main__":
    main()
