"""Compression methods as the papers run them, at half the teacher's parameters and one distillation budget.

The teacher is the cached ``configs/dit.yaml`` recipe (the one ``configs/dicomp.yaml`` builds) or ``--teacher``.
Every row is a full method, labelled as what it runs (selection, initialisation, losses, phases); all students
have about 51% of the teacher's parameters and get the same number of optimiser steps at the same batch and
learning rate. For every seed the student's EMA network is sampled with the teacher's sampler (``--sampling-steps``)
on class-balanced labels and scored by FID (digits-classifier features, digits reference). The table reports
mean ± sd over seeds, the paired difference against LAPTOP on the same seeds, and flags rows whose student is
the same cut as another row's (same kept blocks, segments and widths) on a seed. Writes
``bench/results/dicomp.json`` (after every run, so an interrupted bench keeps its rows; ``--resume`` reuses them)
and ``bench/results/dicomp.md``.

    python bench/dicomp.py --teacher PATH [--steps 200] [--seeds 0 1 2] [--samples 500] [--rows laptop ppcl ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from ditlab.data.digits import DigitsDataModule
from ditlab.methods.compress.module import DicompModule, DistillConfig, PhaseConfig, PruneConfig
from ditlab.methods.teacher import TeacherConfig, build_from_recipe
from ditlab.metrics.fid import evaluate_images
from ditlab.models.budget import parameter_count

RESULTS = Path(__file__).parent / "results"
LAPTOP_KD = DistillConfig(task_weight=1.0, output_weight=1.0, feature_weight=1.0, feature_loss="normalized_mse")


def rows(steps: int) -> dict[str, tuple[str, dict]]:
    """Row name -> (what it runs, DicompModule arguments). Phased rows split ``steps`` in half."""
    half = steps // 2
    ppcl_local = PhaseConfig(steps=half, task_weight=0.0, output_weight=0.0, feature_weight=1.0, feature_loss="direction",
                             teacher_forced=True, trainable="replaced", layers="replaced")  # fmt: skip
    ppcl_magnitude = PhaseConfig(**{**vars(ppcl_local), "feature_loss": "direction_magnitude"})
    amber_layerwise = PhaseConfig(steps=half, task_weight=0.0, output_weight=0.0, feature_weight=1.0,
                                  feature_loss="normalized_mse", teacher_forced=True, trainable="blocks")  # fmt: skip
    amber_full = DistillConfig(task_weight=1.0, output_weight=1.0, feature_weight=0.0)
    taylor = {"width_score": "taylor"}
    return {
        "laptop": ("LAPTOP: one-shot output loss + knapsack (additivity check, iterative fallback), copy init, "
                   "task + output KD (prediction channels) + normalised feature KD",
                   {"prune": {"criterion": "laptop", "num_blocks": 6, "options": {"additivity_sets": 50}}}),
        "tinyfusion": ("TinyFusion: learned 1:2 layer mask (Gumbel, 100 joint steps, weights discarded), copy init, "
                       "LAPTOP distillation",
                       {"prune": {"criterion": "tinyfusion", "num_blocks": 6,
                                  "options": {"group_size": 2, "steps": 100, "lr": 5e-4}}}),
        "amber": ("Amber: timestep-sensitive (max over bins), local averaging init, layer-wise teacher-forced KD "
                  "then full fine-tune (task + output KD)",
                  {"prune": {"criterion": "amber", "num_blocks": 6, "init": "average"}, "phases": [amber_layerwise],
                   "distill": amber_full}),
        "ppcl": ("PPCL: probe/CKA interval plan (cost order, absorb), middle-block init, teacher-forced direction "
                 "loss on the replacements only (rest frozen), then global phase (LAPTOP losses)",
                 {"prune": {"criterion": "ppcl", "num_blocks": 6}, "phases": [ppcl_local]}),
        "ppcl+magnitude": ("PPCL as above, its local phase with the magnitude term (direction + squared relative "
                           "error of each token's norm)",
                           {"prune": {"criterion": "ppcl", "num_blocks": 6}, "phases": [ppcl_magnitude]}),
        "width": ("width only: 12 blocks, 2/4 heads, 64/512 MLP channels by Taylor score, LAPTOP distillation",
                  {"prune": {"criterion": "first", "num_blocks": 12, "num_heads": 2, "mlp_hidden": 64, **taylor}}),
        "depth+width": ("depth + width: LAPTOP to 9 blocks, 2/4 heads, 256/512 MLP channels by Taylor score, "
                        "LAPTOP distillation",
                        {"prune": {"criterion": "laptop", "num_blocks": 9, "num_heads": 2, "mlp_hidden": 256,
                                   **taylor}}),
        "random": ("random 6 blocks (seeded), copy init, LAPTOP distillation",
                   {"prune": {"criterion": "random", "num_blocks": 6}}),
        "first": ("first 6 blocks, copy init, LAPTOP distillation", {"prune": {"criterion": "first", "num_blocks": 6}}),
    }  # fmt: skip


def student(teacher: Path, name: str, seed: int, args: argparse.Namespace) -> dict:
    """Cut, distil for ``args.steps`` and measure one student."""
    _, spec = rows(args.steps)[name]
    L.seed_everything(seed, verbose=False)
    prune = PruneConfig(**{**spec["prune"], "seed": seed, "calibration_images": args.calibration})
    module = DicompModule(teacher=TeacherConfig(checkpoint=str(teacher)), prune=prune,
                          distill=spec.get("distill", LAPTOP_KD), phases=spec.get("phases"),
                          lr=args.lr, warmup_steps=args.steps // 10, ema_decay=0.99)  # fmt: skip
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    started = time.perf_counter()
    trainer.fit(module, DigitsDataModule(batch_size=args.batch_size, image_size=module.teacher.input_size))
    labels = torch.arange(args.samples) % module.network.num_classes
    images = module.sample(labels, seed=seed * 100_000, steps=args.sampling_steps)
    fid = evaluate_images(images, reference="digits", features="digits-classifier")["fid"]
    config = module.network.config
    selection = module.summary["selection"]
    return {"row": name, "seed": seed, "keep": module.keep, "segments": [list(s) for s in module.segments],
            "width": [config.num_heads, config.mlp_width], "parameters": parameter_count(module.network),
            "fid": fid, "seconds": time.perf_counter() - started,
            **{key: selection[key] for key in ("intervals", "fallback", "used_solver", "additivity") if key in selection}}


def teacher_fid(teacher: Path, seed: int, args: argparse.Namespace) -> tuple[float, int]:
    """The teacher's FID with the same sampler, steps and seeds as the students, and its parameter count."""
    module = DicompModule(teacher=TeacherConfig(checkpoint=str(teacher)))
    network = module.teacher  # loads the teacher with its objective and sampling settings
    module.objective = module.objective_config.build(network.learn_sigma)
    labels = torch.arange(args.samples) % network.num_classes
    images = module.sample(labels, seed=seed * 100_000, network=network, steps=args.sampling_steps)
    return evaluate_images(images, reference="digits", features="digits-classifier")["fid"], parameter_count(network)


def cut(run: dict) -> tuple:
    """What makes two students the same cut of the teacher."""
    return tuple(run["keep"]), tuple(map(tuple, run["segments"])), tuple(run["width"])


def table(result: dict) -> str:
    """Markdown rows; ratios and differences use only the seeds the row has (an interrupted bench is partial)."""
    seeds = result["settings"]["seeds"]
    teacher = dict(zip(seeds, result["teacher_fid"]))
    runs = result["students"]
    laptop = {run["seed"]: run["fid"] for run in runs if run["row"] == "laptop"}
    names = [name for name in rows(result["settings"]["steps"]) if any(run["row"] == name for run in runs)]
    lines = ["| row | params | kept blocks / segments (seed 0) | seeds | FID mean ± sd | vs teacher "
             "| paired Δ vs LAPTOP | same cut as |", "|---|---:|---|---|---:|---:|---:|---|",
             f"| teacher (12 blocks) | 1.000 | all | {seeds} | {statistics.mean(teacher.values()):.2f} ± "
             f"{statistics.pstdev(teacher.values()):.2f} | 1.00 | | |"]  # fmt: skip
    for name in names:
        mine = sorted((run for run in runs if run["row"] == name), key=lambda run: run["seed"])
        fids, used = [run["fid"] for run in mine], [run["seed"] for run in mine]
        first = mine[0]
        shown = first["segments"] if name == "ppcl" else first["keep"]
        if name in ("width", "depth+width"):
            shown = f"{first['keep']} heads {first['width'][0]} mlp {first['width'][1]}"
        paired = [run["fid"] - laptop[run["seed"]] for run in mine if run["seed"] in laptop]
        delta = "" if name == "laptop" or not paired else (
            f"{statistics.mean(paired):+.2f} ± {statistics.pstdev(paired):.2f}")  # fmt: skip
        duplicates = sorted({f"{other['row']} (seed {other['seed']})" for run in mine for other in runs
                             if other["row"] != name and other["seed"] == run["seed"] and cut(other) == cut(run)})
        ratio = first["parameters"] / result["teacher_parameters"]
        versus = statistics.mean(fids) / statistics.mean(teacher[seed] for seed in used)
        lines.append(f"| {name} | {ratio:.3f} | {shown} | {used} | {statistics.mean(fids):.2f} ± "
                     f"{statistics.pstdev(fids):.2f} | {versus:.2f} | {delta} | {', '.join(duplicates)} |")  # fmt: skip
    return "\n".join(lines)


def write(result: dict, args: argparse.Namespace) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1))
    labels = "\n".join(f"- **{name}**: {label}" for name, (label, _) in rows(args.steps).items())
    settings = {key: value for key, value in vars(args).items() if key not in ("resume", "report", "teacher", "out")}
    evidence = []
    for run in result["students"]:
        if run["row"] == "ppcl" and "intervals" in run:
            plan = [(i["start"], i["end"], i["keep"]) for i in run["intervals"]]
            evidence.append(f"- PPCL plan, seed {run['seed']}: intervals (start, end, copied block) {plan}")
        if run["row"] == "ppcl+magnitude":
            plain = [other["fid"] for other in result["students"] if other["row"] == "ppcl" and other["seed"] == run["seed"]]
            if plain:
                evidence.append(f"- PPCL magnitude term, seed {run['seed']}: FID {run['fid']:.2f} vs {plain[0]:.2f} "
                                f"without ({run['fid'] - plain[0]:+.2f})")
        if run["row"] == "laptop" and "additivity" in run:
            check = run["additivity"]
            evidence.append(f"- LAPTOP additivity, seed {run['seed']}: Pearson {check['pearson']:.3f}, Spearman "
                            f"{check['spearman']:.3f} over {len(check['sets'])} random pairs/triples; solver "
                            f"{run.get('used_solver')}{' (' + run['fallback'] + ')' if run.get('fallback') else ''}")
    markdown = (f"# dicomp: full compression methods at ~51% of the teacher's parameters\n\n"
                f"Teacher: `{result['teacher']}`. Settings: {settings}. Load average (1/5/15 min) at start / at the "
                f"last run: {result['load']}.\n\n{table(result)}\n\nRows:\n{labels}\n\nEvidence:\n"
                + "\n".join(evidence) + "\n")  # fmt: skip
    (RESULTS / f"{args.out}.md").write_text(markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=None, help="teacher checkpoint (default: the cached recipe)")
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps per student (phases split them)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=500, help="images per FID")
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calibration", type=int, default=256, help="calibration images for the criteria")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rows", nargs="+", default=list(rows(2)), choices=list(rows(2)))
    parser.add_argument("--resume", action="store_true", help="keep the runs already in bench/results/OUT.json")
    parser.add_argument("--report", action="store_true", help="only rewrite OUT.md from OUT.json")
    parser.add_argument("--out", default="dicomp", help="results name: bench/results/OUT.{json,md}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    if args.report:
        result = json.loads((RESULTS / f"{args.out}.json").read_text())
        args = argparse.Namespace(**{**vars(args), **result["settings"], "report": True, "out": args.out})
        write(result, args)
        print(table(result))
        return
    torch.set_num_threads(args.threads)
    teacher = args.teacher or build_from_recipe(TeacherConfig())
    load = lambda: [round(value, 2) for value in __import__("os").getloadavg()]  # noqa: E731
    result = {"teacher": str(teacher), "settings": {k: v for k, v in vars(args).items() if k != "teacher"},
              "students": [], "load": [load()]}  # fmt: skip
    result["settings"]["teacher"] = str(teacher)
    if args.resume and (RESULTS / f"{args.out}.json").is_file():
        previous = json.loads((RESULTS / f"{args.out}.json").read_text())
        result["students"] = [run for run in previous["students"] if run["row"] in args.rows and run["seed"] in args.seeds]
        if previous.get("teacher_fid") and previous.get("settings", {}).get("seeds") == args.seeds:
            result["teacher_fid"], result["teacher_parameters"] = previous["teacher_fid"], previous["teacher_parameters"]
    if "teacher_fid" not in result:
        measured = [teacher_fid(teacher, seed, args) for seed in args.seeds]
        result["teacher_fid"], result["teacher_parameters"] = [m[0] for m in measured], measured[0][1]
    done = {(run["row"], run["seed"]) for run in result["students"]}
    for seed in args.seeds:  # seed-major: an interrupted bench still has every row on the first seeds
        for name in args.rows:
            if (name, seed) in done:
                continue
            result["students"].append(student(teacher, name, seed, args))
            result["load"] = [result["load"][0], load()]
            print(json.dumps({k: v for k, v in result["students"][-1].items() if k != "additivity"}), flush=True)
            write(result, args)
    write(result, args)
    print(table(result))


if __name__ == "__main__":
    main()
