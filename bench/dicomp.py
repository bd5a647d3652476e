"""Which blocks to keep? Student FID per selection criterion at the same depth ratio and distillation budget.

The teacher is the cached ``configs/dit.yaml`` recipe (the one ``configs/dicomp.yaml`` builds). For every
criterion (random, first-N, last-N, PPCL-style, LAPTOP-style, Amber-style) and seed, the student keeps
half the blocks, is distilled for the same number of steps, and its EMA network's FID (digits-classifier
features, against the digits reference) is measured on class-balanced samples. Writes
``bench/results/dicomp.json`` and ``bench/results/dicomp.md``.

    python bench/dicomp.py [--steps 300] [--seeds 0 1 2] [--samples 500]
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
from ditlab.methods.compress.analysis import CRITERIA
from ditlab.methods.compress.module import DicompModule, DistillConfig, PruneConfig
from ditlab.methods.teacher import TeacherConfig, build_from_recipe
from ditlab.metrics.fid import evaluate_images

RESULTS = Path(__file__).parent / "results"


def student_fid(teacher: Path, criterion: str, seed: int, args: argparse.Namespace) -> dict:
    """Cut, distil for ``args.steps`` and measure one student."""
    L.seed_everything(seed, verbose=False)
    module = DicompModule(
        teacher=TeacherConfig(checkpoint=str(teacher)),
        prune=PruneConfig(criterion=criterion, num_blocks=args.blocks, seed=seed),
        distill=DistillConfig(),
        lr=args.lr, warmup_steps=args.steps // 10, ema_decay=0.99,
    )  # fmt: skip
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    started = time.perf_counter()
    trainer.fit(module, DigitsDataModule(batch_size=args.batch_size, image_size=module.teacher.input_size))
    labels = torch.arange(args.samples) % module.network.num_classes
    images = module.sample(labels, seed=seed * 100_000, steps=args.sampling_steps)
    metrics = evaluate_images(images, reference="digits", features="digits-classifier")
    return {"criterion": criterion, "seed": seed, "keep": module.keep, "fid": metrics["fid"],
            "fid_features": metrics["fid_features"], "seconds": time.perf_counter() - started}  # fmt: skip


def teacher_fid(teacher: Path, seed: int, args: argparse.Namespace) -> float:
    """The teacher's FID with the same sampler, steps and seeds as the students."""
    module = DicompModule(teacher=TeacherConfig(checkpoint=str(teacher)))
    network = module.teacher  # loads the teacher with its objective and sampling settings
    module.objective = module.objective_config.build(network.learn_sigma)
    labels = torch.arange(args.samples) % network.num_classes
    images = module.sample(labels, seed=seed * 100_000, network=network, steps=args.sampling_steps)
    return evaluate_images(images, reference="digits", features="digits-classifier")["fid"]


def table(rows: list[dict], teacher: list[float]) -> str:
    mean_teacher = statistics.mean(teacher)
    lines = ["| criterion | kept blocks (seed 0) | student FID (mean ± sd) | vs teacher |", "|---|---|---|---|",
             f"| teacher (12 blocks) | all | {mean_teacher:.2f} ± {statistics.pstdev(teacher):.2f} | 1.00 |"]  # fmt: skip
    for criterion in CRITERIA:
        runs = [row for row in rows if row["criterion"] == criterion]
        if not runs:
            continue
        fids = [row["fid"] for row in runs]
        lines.append(f"| {criterion} | {runs[0]['keep']} | {statistics.mean(fids):.2f} ± {statistics.pstdev(fids):.2f} "
                     f"| {statistics.mean(fids) / mean_teacher:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="distillation steps per student")
    parser.add_argument("--blocks", type=int, default=6, help="student depth (the teacher has 12)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=500, help="images per FID")
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    args = parser.parse_args()
    teacher = build_from_recipe(TeacherConfig())
    teacher_fids = [teacher_fid(teacher, seed, args) for seed in args.seeds]
    rows = []
    for criterion in args.criteria:
        for seed in args.seeds:
            rows.append(student_fid(teacher, criterion, seed, args))
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    result = {"teacher": str(teacher), "teacher_fid": teacher_fids, "settings": vars(args), "students": rows,
              "machine": f"{torch.get_num_threads()} torch threads, CPU"}  # fmt: skip
    (RESULTS / "dicomp.json").write_text(json.dumps(result, indent=2))
    markdown = table(rows, teacher_fids)
    (RESULTS / "dicomp.md").write_text(f"# dicomp: selection criteria at 50% depth\n\nSettings: {vars(args)}\n\n{markdown}\n")
    print(markdown)


if __name__ == "__main__":
    main()
