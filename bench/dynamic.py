"""Dynamic compute on digits: FLOPs ratio, measured sampling speed and FID of DyDiT, Elastic-DiT and DC-DiT.

Every method fine-tunes (DC-DiT: upcycles) the cached digits teacher (``configs/dit.yaml``) for the same number
of steps, per seed. Each trained network is sampled in its exported form (sliced weights, gathered tokens,
skipped samples), so the speed is the one a user gets. Reported per method and target:

- FLOPs ratio: FLOPs per image over the teacher's, averaged over every model call of the FID sampling run, from
  the network's own measured FLOPs (routers included);
- speed-up: teacher time over method time for the same images, sampler and seeds, interleaved
  (teacher, method, method, teacher; best of two each) in one process, so machine load cancels;
- FID (digits-classifier features against the digits reference) on class-balanced samples, sampling seeds
  per training seed;
- depth pruning at the same FLOPs: the teacher cut to ``round(depth x ratio)`` blocks (dicomp, LAPTOP
  criterion) and distilled for the same number of steps.

DyDiT's FLOPs target follows ``DynamicConfig.target_at`` as DyDiT's ``train.py`` computes it (checked against the
authors' release, kawgit/DyDiT at 0ddc5097d2bc38c9b68b6c32ac6b53adadc1f865): ``lambda = 1 - (1 - target) step / W``
counted from step 0, held at 1 before step ``H``; here ``W = steps // 2`` (the target is reached half-way, then
held) and ``H = steps // 8`` (:func:`lambda_schedule`). Reports written before this (``bench/results/dynamic.*`` up
to the fix) ran the old meaning: 1 until ``H``, then a fall over ``W`` more steps, reaching the target at
``H + W = 5/8`` of the steps.

Writes ``bench/results/dynamic.json`` and ``bench/results/dynamic.md``.

    python bench/dynamic.py [--steps 200] [--seeds 0 1 2] [--samples 250] [--sampling-steps 25]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from ditlab.data.digits import DigitsDataModule
from ditlab.methods.compress.module import DicompModule, DistillConfig, PruneConfig
from ditlab.methods.dynamic.export import dynamic_flops
from ditlab.methods.dynamic.module import DynamicConfig, DynamicModule
from ditlab.methods.dynamic.routing import DynamicTrunk
from ditlab.methods.teacher import TeacherConfig, build_from_recipe
from ditlab.metrics.fid import evaluate_images
from ditlab.models.budget import flops_per_image

RESULTS = Path(__file__).parent / "results"
TEACHER = Path(os.environ.get("DITLAB_CACHE", "~/.cache/ditlab")).expanduser() / "teachers"

FAST_DYDIT = {"groups": 4, "width_bias": 2.0, "token_bias": 2.0}  # on at init, yet reachable in ~100 steps
DCDIT = {"ratio_weight": 0.03, "ratio_group": 16, "strata": 1, "complete_model_steps": 0,
         "freeze": ["t_embedder", "y_embedder"]}  # DC-DiT's (configs/dcdit.yaml): paper weight, uniform t, upcycling
METHODS = {
    "dydit-0.7": DynamicConfig(trunk="dydit", trunk_options=FAST_DYDIT, flops_target=0.7),
    "dydit-0.5": DynamicConfig(trunk="dydit", trunk_options=FAST_DYDIT, flops_target=0.5),
    "elastic-a": DynamicConfig(trunk="elastic", trunk_options={"router_hidden": 32}, flops_weight=0.0,
                               keep_high=1.0, keep_low=0.6, width_target=0.75, complete_model_steps=0),
    "elastic-b": DynamicConfig(trunk="elastic", trunk_options={"router_hidden": 32}, flops_weight=0.0,
                               keep_high=0.9, keep_low=0.4, width_target=0.5, complete_model_steps=0),
    **{f"dcdit-{n:g}x": DynamicConfig(trunk="chunking", trunk_options={"router_bias": 0.0}, flops_weight=0.0, **DCDIT,
                                      chunk_target=n) for n in (2.0, 3.0, 2.2, 2.5)},
    "dcdit-2x-r0.3": DynamicConfig(trunk="chunking", trunk_options={"router_bias": 0.0}, flops_weight=0.0,
                                   **{**DCDIT, "ratio_weight": 0.3}, chunk_target=2.0),  # 10x DC-DiT's ratio weight
}  # fmt: skip


def write(report: dict, out: Path) -> None:
    """``out.json`` and ``out.md`` (``out`` may carry dots: ``dynamic.seed0``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(report, indent=1, default=str))
    out.with_name(out.name + ".md").write_text(markdown(report))


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def fit(module, steps: int, batch_size: int) -> float:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0)  # fmt: skip
    started = time.perf_counter()
    trainer.fit(module, DigitsDataModule(batch_size=batch_size, image_size=16))
    return time.perf_counter() - started


def lambda_schedule(steps: int) -> dict[str, int]:
    """DyDiT's FLOPs-target schedule for a fine-tune of ``steps`` steps, in ``DynamicConfig``'s meaning:
    ``target_warmup_steps`` is the step at which lambda reaches the target (the fall counted from step 0, as DyDiT's
    ``train.py``), ``target_hold_steps`` the steps held at 1 before it (DyDiT: 100 of a 1000- or 5000-step fall)."""
    return {"target_hold_steps": steps // 8, "target_warmup_steps": steps // 2}


def method_config(config: DynamicConfig, args: argparse.Namespace) -> DynamicConfig:
    """``config`` with the bench's schedule for ``args.steps``: lambda, router learning rate, DyDiT's stage 1."""
    schedule = {**lambda_schedule(args.steps), "router_lr_scale": args.router_lr_scale}
    if config.complete_model_steps is None:
        schedule["complete_model_steps"] = args.steps // 2  # DyDiT stage 1, then without the complete model
    return DynamicConfig(**{**config.__dict__, **schedule})


def train_dynamic(teacher: Path, config: DynamicConfig, seed: int, args: argparse.Namespace) -> DynamicModule:
    L.seed_everything(seed, verbose=False)
    config = method_config(config, args)
    module = DynamicModule(teacher=TeacherConfig(checkpoint=str(teacher)), dynamic=config, lr=args.lr,
                           warmup_steps=10, ema_decay=args.ema_decay)  # fmt: skip
    module.train_seconds = fit(module, args.steps, args.batch_size)
    return module


def train_depth(teacher: Path, blocks: int, seed: int, args: argparse.Namespace) -> DicompModule:
    L.seed_everything(seed, verbose=False)
    module = DicompModule(teacher=TeacherConfig(checkpoint=str(teacher)),
                          prune=PruneConfig(criterion="laptop", num_blocks=blocks, seed=seed), distill=DistillConfig(),
                          lr=args.lr * 2, warmup_steps=10, ema_decay=args.ema_decay)  # fmt: skip
    module.train_seconds = fit(module, args.steps, args.batch_size)
    return module


def sample(module, network, labels: torch.Tensor, seed: int, args: argparse.Namespace) -> torch.Tensor:
    return module.sample(labels, seed=seed, network=network, steps=args.sampling_steps)


def sampling_seeds(seed: int, args: argparse.Namespace) -> list[int]:
    """Noise seeds of the FID samples of training seed ``seed`` (the teacher uses the same ones)."""
    return [(seed * 10 + s) * 100_000 for s in args.sampling_seeds]


def flops_ratio(module, network, teacher_flops: int, seed: int, args: argparse.Namespace
                ) -> tuple[torch.Tensor, float]:  # fmt: skip
    """Samples for FID and the FLOPs per image of every model call that made them, over the teacher's."""
    spent, rows = [], []
    handle = None
    if isinstance(getattr(network, "trunk", None), DynamicTrunk):  # a plain (depth-pruned) network: counted below
        def record(m, inputs, output) -> None:
            spent.append(float(dynamic_flops(m).sum()))
            rows.append(len(output))

        handle = network.register_forward_hook(record)
    labels = torch.arange(args.samples) % network.num_classes
    counted = []
    try:
        for noise_seed in sampling_seeds(seed, args):
            counted.append(sample(module, network, labels, noise_seed, args))
    finally:
        if handle is not None:
            handle.remove()
    ratio = sum(spent) / sum(rows) / teacher_flops if spent else flops_per_image(network) / teacher_flops
    return torch.stack(counted), ratio


def speedup(module, network, teacher, args: argparse.Namespace) -> dict:
    """Teacher seconds over method seconds on the same images, interleaved T M M T, best of two each."""
    labels = torch.arange(args.timing_images) % network.num_classes
    times = {"teacher": [], "method": []}
    for name in ("teacher", "method", "method", "teacher"):
        started = time.perf_counter()
        sample(module, teacher if name == "teacher" else network, labels, 7, args)
        times[name].append(time.perf_counter() - started)
    teacher_s, method_s = min(times["teacher"]), min(times["method"])
    return {"speedup": teacher_s / method_s, "images_per_s": args.timing_images / method_s,
            "teacher_images_per_s": args.timing_images / teacher_s}  # fmt: skip


def measure(name: str, seed: int, module, network, teacher, teacher_flops: int, args) -> dict:
    network.eval()
    samples, ratio = flops_ratio(module, network, teacher_flops, seed, args)
    fids = [evaluate_images(images, reference="digits", features="digits-classifier")["fid"] for images in samples]
    row = {"method": name, "seed": seed, "flops_ratio": ratio, "fid": statistics.mean(fids), "fid_per_sampling_seed": fids,
           "train_seconds": getattr(module, "train_seconds", 0.0), **speedup(module, network, teacher, args)}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def teacher_row(teacher_path: Path, seed: int, args) -> tuple[dict, DicompModule]:
    module = DicompModule(teacher=TeacherConfig(checkpoint=str(teacher_path)))
    teacher = module.teacher
    module.objective = module.objective_config.build(teacher.learn_sigma)
    labels = torch.arange(args.samples) % teacher.num_classes
    fids = [evaluate_images(sample(module, teacher, labels, noise_seed, args), reference="digits",
                            features="digits-classifier")["fid"] for noise_seed in sampling_seeds(seed, args)]  # fmt: skip
    return {"method": "teacher", "seed": seed, "flops_ratio": 1.0, "fid": statistics.mean(fids),
            "fid_per_sampling_seed": fids, "speedup": 1.0}, module  # fmt: skip


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    for name in dict.fromkeys(row["method"] for row in rows):
        runs = [row for row in rows if row["method"] == name]

        def stat(key: str, runs: list[dict] = runs) -> tuple[float, float]:
            values = [row[key] for row in runs]
            return statistics.mean(values), statistics.pstdev(values)

        teacher = {row["seed"]: row["fid"] for row in rows if row["method"] == "teacher"}
        paired = [round(row["fid"] - teacher[row["seed"]], 2) for row in runs if row["seed"] in teacher]
        table.append({"method": name, "seeds": len(runs), "flops_ratio": stat("flops_ratio"), "fid": stat("fid"),
                      "speedup": stat("speedup"), "fid_minus_teacher_per_seed": paired})  # fmt: skip
    return table


def markdown(report: dict) -> str:
    teacher_fid = next(r["fid"][0] for r in report["summary"] if r["method"] == "teacher")
    lines = [f"Load average at start {report['load_start']}, at end {report['load_end']}. {report['setup']}", "",
             "| method | seeds | FLOPs ratio | sampling speed-up (measured) | FID | FID / teacher | FID - teacher per seed |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in report["summary"]:
        (ratio, ratio_sd), (fid, fid_sd), (speed, speed_sd) = row["flops_ratio"], row["fid"], row["speedup"]
        lines.append(f"| {row['method']} | {row['seeds']} | {ratio:.3f} ± {ratio_sd:.3f} | {speed:.2f}x ± {speed_sd:.2f}"
                     f" | {fid:.2f} ± {fid_sd:.2f} | {fid / teacher_fid:.2f} |"
                     f" {' / '.join(f'{d:+.2f}' for d in row.get('fid_minus_teacher_per_seed', []))} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=None, help="teacher .ckpt (default: the configs/dit.yaml build)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--depth-baseline", nargs="*", default=["dydit-0.7", "dydit-0.5"],
                        help="methods whose measured FLOPs ratio a depth-pruned student is matched to")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps per method and seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--sampling-seeds", type=int, nargs="+", default=[0], help="sampling seeds per model")
    parser.add_argument("--samples", type=int, default=250, help="images per FID")
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--timing-images", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--router-lr-scale", type=float, default=100.0,
                        help="router learning rate over the backbone's (short fine-tunes need fast routers)")
    parser.add_argument("--out", type=Path, default=RESULTS / "dynamic")
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="EMA of the fine-tuned weights (None: sample the trained weights; an EMA lags far behind "
                             "the routers in a fine-tune this short)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (protocol v2: chosen, recorded)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="combine the JSON reports of runs split by seed into --out, and stop")
    args = parser.parse_args()
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        rows = [row for part in parts for row in part["rows"]]
        teachers = {row["seed"]: row for row in rows if row["method"] == "teacher"}  # one per seed, however split
        rows = list(teachers.values()) + [row for row in rows if row["method"] != "teacher"]
        setups = list(dict.fromkeys(p["setup"] for p in parts))
        report = {"setup": " | ".join(setups) + f"; merged from {len(parts)} runs ({', '.join(str(p) for p in args.merge)})",
                  "load_average_start": max(float(p["load_start"].split()[0]) for p in parts),
                  "load_start": " / ".join(p["load_start"] for p in parts),
                  "load_end": " / ".join(p["load_end"] for p in parts), "rows": rows, "summary": summarise(rows)}  # fmt: skip
        write(report, args.out)
        print(markdown(report))
        return
    torch.set_num_threads(args.threads)
    load_start = load_average()
    teacher_path = args.teacher or build_from_recipe(TeacherConfig())
    rows: list[dict] = []
    for seed in args.seeds:
        row, teacher_module = teacher_row(teacher_path, seed, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
        teacher = teacher_module.teacher
        teacher_flops = flops_per_image(teacher)
        ratios = {}
        for name in args.methods:
            module = train_dynamic(teacher_path, METHODS[name], seed, args)
            result = measure(name, seed, module, module.sampling_network, teacher, teacher_flops, args)
            rows.append(result)
            ratios[name] = result["flops_ratio"]
        for name in args.depth_baseline:
            if name in ratios:
                blocks = max(1, round(teacher.depth * ratios[name]))
                module = train_depth(teacher_path, blocks, seed, args)
                rows.append(measure(f"depth-{blocks}/{teacher.depth} (~{name})", seed, module,
                                    module.sampling_network, teacher, teacher_flops, args))  # fmt: skip
        schedule = lambda_schedule(args.steps)
        report = {"setup": f"teacher {teacher_path}, {args.steps} fine-tuning steps, batch {args.batch_size}, "
                           f"DyDiT lambda = 1 - (1 - target) step/{schedule['target_warmup_steps']} from step 0, "
                           f"held at 1 before step {schedule['target_hold_steps']}, "
                           f"{args.samples} samples x {len(args.sampling_seeds)} sampling seeds per FID, "
                           f"{args.sampling_steps} {teacher_module.sampling.sampler} steps, cfg "
                           f"{teacher_module.sampling.cfg_scale}, {args.threads} CPU thread(s), EMA {args.ema_decay}",
                  "load_start": load_start, "load_average_start": float(load_start.split()[0]),
                  "load_end": load_average(), "rows": rows, "summary": summarise(rows)}  # fmt: skip
        write(report, args.out)
    print(markdown(report))


if __name__ == "__main__":
    main()
