"""Mixture of experts on digits: DiT-MoE vs a dense DiT from scratch, and Dense2MoE vs depth pruning from a teacher.

Part ``scratch`` (DiT-MoE, arXiv 2407.11633): ``configs/dit_moe.yaml`` (8 SwiGLU experts, top-2, a shared expert,
rectified flow) against the same file with DiT's dense MLP, which has the same *activated* parameter count
(3.65M each; the MoE holds 7.19M in total), at equal steps, batch and learning rate, per seed.

Part ``dense2moe`` (arXiv 2510.09094): from one dense teacher (the cached ``configs/dit.yaml`` recipe, or
``--teacher``), ``configs/dense2moe.yaml`` (carve every FFN into 1 shared + top-2 of 7 routed experts, distil,
then a Mixture of Blocks running 9 of 12 blocks) and its carving stage alone, against LAPTOP depth pruning to
the block count whose activated parameters are closest to the Mixture of Blocks', distilled with the same
losses, steps and learning rate.

Every row: FID on digits-classifier features (class-balanced labels, sample ``i`` seeded ``1000 * seed + i``, the
same noise for every method of a seed), total and activated parameters, FLOPs per image counted from the
components (``ditlab.models.budget``) and measured with ``FlopCounterMode`` (which does not see CPU's fused
attention kernel, so its figure lacks ``q k^T`` and ``attn v``), training wall time per step (median after
warm-up) and sampling images/s. Times are ratios within one run only. Rows are appended to
``bench/results/moe.json`` as they finish (a rerun with other parts or seeds adds to it; ``--fresh`` restarts);
``moe.md`` and ``moe.png`` are rewritten from all rows.

    python bench/moe.py [--parts scratch dense2moe] [--seeds 0 1 2] [--scratch-steps 300] [--distill-steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from ditlab.callbacks.progressive import ProgressiveDistillation
from ditlab.data.digits import DigitsDataModule
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.base import DiffusionModule
from ditlab.methods.compress.carve import CarveConfig
from ditlab.methods.compress.dense2moe import BlockMixtureConfig, Dense2MoEModule, describe_network
from ditlab.methods.compress.module import DicompModule, DistillConfig, PruneConfig
from ditlab.methods.teacher import TeacherConfig, build_from_recipe
from ditlab.metrics.fid import evaluate_images
from ditlab.models.budget import activated_parameter_count, parameter_count
from ditlab.models.config import DiTConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


class StepTimer(L.Callback):
    """Wall seconds of every training step (forward, backward, optimiser, EMA)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)

    def median(self, warmup: int = 5) -> float:
        return statistics.median(self.seconds[warmup:] or self.seconds)


def recipe(name: str) -> dict:
    """The model ``init_args`` of ``configs/<name>`` (interpolated sizes dropped: the preset gives them)."""
    model = yaml.safe_load((ROOT / "configs" / name).read_text())["model"]["init_args"]
    model["network"] = {k: v for k, v in model.get("network", {}).items() if not str(v).startswith("${")}
    return model


def train(module: L.LightningModule, steps: int, batch_size: int, callbacks=()) -> float:
    """Fit ``module`` for ``steps`` on digits; returns the median wall seconds per step."""
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[timer, *callbacks])  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=batch_size, image_size=16))
    return timer.median()


def measured_flops(network: torch.nn.Module) -> int:
    """``FlopCounterMode``'s count for one eval forward of one image (routers and dispatch included)."""
    x, t, y = torch.randn(1, 1, 16, 16), torch.tensor([500.0]), torch.tensor([3])
    was_training = network.training
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network.eval()(x, t, y)
    network.train(was_training)
    return counter.get_total_flops()


def quality(module: DiffusionModule, network, seed: int, args: argparse.Namespace) -> dict:
    """FID of ``network`` sampled by ``module``'s sampler at ``args.sampling_steps``, and sampling images/s."""
    labels = torch.arange(args.samples) % 10
    started = time.perf_counter()
    images = module.sample(labels, seed=1000 * seed, network=network, steps=args.sampling_steps)
    seconds = time.perf_counter() - started
    metrics = evaluate_images(images, reference="digits", features="digits-classifier")
    settings = module.sampling
    sampler = {"sampler": settings.sampler or module.objective.default_sampler, "steps": args.sampling_steps,
               "cfg_scale": settings.cfg_scale}  # fmt: skip
    return {"fid": metrics["fid"], "fid_features": metrics["fid_features"], "num_samples": args.samples,
            "sampler": sampler, "images_per_s": args.samples / seconds}  # fmt: skip


def costs(network) -> dict:
    described = describe_network(network)
    return {"params_total": described["parameters"], "params_active": described["activated_parameters"],
            "ffn_params_active": described["ffn_activated_parameters"], "flops_per_image": described["flops_per_image"],
            "flops_per_image_measured": measured_flops(network), "blocks_run": described["blocks"]}  # fmt: skip


def row(method: str, knob: dict, seed: int, steps: int, step_seconds: float, measured: dict, network) -> dict:
    return {"method": method, "knob": knob, "seed": seed, **measured, **costs(network), "peak_memory_mb": None,
            "train_steps": steps, "train_seconds_per_step": step_seconds}  # fmt: skip


# --- part 1: from scratch --------------------------------------------------------------------------------------


def scratch_runs(seed: int, args: argparse.Namespace) -> list[dict]:
    model = recipe("dit_moe.yaml")
    rows = []
    for method, mlp in (("dense DiT", {"mlp": "dense", "mlp_options": {}}), ("DiT-MoE", {})):
        L.seed_everything(seed, verbose=False)
        network = DiTConfig(**{**model["network"], **mlp})
        module = DiffusionModule(network=network, objective=ObjectiveConfig(**model["objective"]),
                                 sampling=SamplingConfig(**model["sampling"]), lr=model["lr"],
                                 warmup_steps=model["warmup_steps"], ema_decay=model["ema_decay"])  # fmt: skip
        seconds = train(module, args.scratch_steps, args.batch_size)
        knob = {"mlp": network.mlp, **network.mlp_options}
        rows.append(row(method, knob, seed, args.scratch_steps, seconds, quality(module, module.ema, seed, args),
                        module.ema))  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --- part 2: from a teacher ------------------------------------------------------------------------------------


def distill_options(model: dict, steps: int) -> dict:
    return {"lr": model["lr"], "warmup_steps": min(model["warmup_steps"], steps // 10), "ema_decay": model["ema_decay"]}


def dense2moe_run(teacher: Path, seed: int, args: argparse.Namespace, mixture: bool) -> dict:
    model = recipe("dense2moe.yaml")
    L.seed_everything(seed, verbose=False)
    module = Dense2MoEModule(teacher=TeacherConfig(checkpoint=str(teacher)), carve=CarveConfig(**{**model["carve"],
                             "seed": seed}), mixture=BlockMixtureConfig(**model["mixture"]),
                             distill=DistillConfig(**model["distill"]), **distill_options(model, args.distill_steps))  # fmt: skip
    stage = [ProgressiveDistillation(at_steps=[args.distill_steps // 2], blocks=[args.mob_blocks])] if mixture else []
    seconds = train(module, args.distill_steps, args.batch_size, stage)
    carve = module.carve
    knob = {"experts": carve.num_experts, "top_k": carve.top_k, "shared_width": carve.shared_width,
            "assignment": carve.assignment, "mixture_of_blocks": f"{args.mob_blocks}/12" if mixture else None}  # fmt: skip
    method = "Dense2MoE: carve + KD + Mixture of Blocks" if mixture else "Dense2MoE: carve + KD (experts only)"
    measured = quality(module, module.ema, seed, args)
    return row(method, knob, seed, args.distill_steps, seconds, measured, module.ema)


def depth_run(teacher: Path, seed: int, blocks: int, args: argparse.Namespace) -> dict:
    model = recipe("dense2moe.yaml")
    L.seed_everything(seed, verbose=False)
    module = DicompModule(teacher=TeacherConfig(checkpoint=str(teacher)),
                          prune=PruneConfig(criterion="laptop", num_blocks=blocks, seed=seed),
                          distill=DistillConfig(**model["distill"]), **distill_options(model, args.distill_steps))  # fmt: skip
    seconds = train(module, args.distill_steps, args.batch_size)
    measured = quality(module, module.ema, seed, args)
    return row("LAPTOP depth pruning + KD", {"blocks": blocks, "keep": module.keep}, seed, args.distill_steps, seconds,
               measured, module.ema)  # fmt: skip


def teacher_row(teacher: Path, seed: int, args: argparse.Namespace) -> dict:
    module = DicompModule(teacher=TeacherConfig(checkpoint=str(teacher)))
    network = module.teacher
    module.objective = module.objective_config.build(network.learn_sigma)
    return row("dense teacher", {"blocks": network.depth}, seed, 0, float("nan"), quality(module, network, seed, args),
               network)  # fmt: skip


def matching_depth(teacher: Path, target_active: int) -> int:
    """The depth-pruned student's block count whose activated parameters are closest to ``target_active``."""
    network = DicompModule(teacher=TeacherConfig(checkpoint=str(teacher))).teacher
    per_block = parameter_count(network.blocks[0])
    outside = activated_parameter_count(network) - network.depth * per_block
    return min(range(1, network.depth + 1), key=lambda k: abs(outside + k * per_block - target_active))


def dense2moe_runs(teacher: Path, seed: int, args: argparse.Namespace) -> list[dict]:
    rows = [teacher_row(teacher, seed, args)]
    print(json.dumps(rows[-1]), flush=True)
    if "experts-only" in args.variants:
        rows.append(dense2moe_run(teacher, seed, args, mixture=False))
        print(json.dumps(rows[-1]), flush=True)
    rows.append(dense2moe_run(teacher, seed, args, mixture=True))
    print(json.dumps(rows[-1]), flush=True)
    rows.append(depth_run(teacher, seed, matching_depth(teacher, rows[-1]["params_active"]), args))
    print(json.dumps(rows[-1]), flush=True)
    return rows


# --- reports ----------------------------------------------------------------------------------------------------


def summary_table(rows: list[dict]) -> str:
    """Per method: mean ± sd over seeds, and the paired per-seed FID difference against its part's baseline."""
    baselines = {"DiT-MoE": "dense DiT", "Dense2MoE: carve + KD + Mixture of Blocks": "dense teacher",
                 "Dense2MoE: carve + KD (experts only)": "dense teacher", "LAPTOP depth pruning + KD": "dense teacher",
                 "dense DiT": None, "dense teacher": None}  # fmt: skip
    lines = ["| method | seeds | steps | params total | params active | FFN active | FLOPs/img (counted / measured) "
             "| FID (mean ± sd) | paired FID diff vs baseline | train s/step | sampling img/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for method, steps in dict.fromkeys((r["method"], r["train_steps"]) for r in rows):
        runs = [r for r in rows if r["method"] == method and r["train_steps"] == steps]
        fids = [r["fid"] for r in runs]
        sd = statistics.stdev(fids) if len(fids) > 1 else 0.0
        base, paired = baselines.get(method), ""
        if base:
            ref = {r["seed"]: r["fid"] for r in rows if r["method"] == base and r["train_steps"] in (0, steps)}
            diffs = [r["fid"] - ref[r["seed"]] for r in runs if r["seed"] in ref]
            if diffs:
                paired = " ".join(f"{d:+.1f}" for d in diffs) + f" (vs {base})"
        first = runs[0]
        seconds = [r["train_seconds_per_step"] for r in runs if r["train_steps"]]
        lines.append(
            f"| {method} | {len(runs)} | {first['train_steps']} | {first['params_total'] / 1e6:.2f}M "
            f"| {first['params_active'] / 1e6:.2f}M | {first['ffn_params_active'] / 1e6:.3f}M "
            f"| {first['flops_per_image'] / 1e6:.1f}M / {first['flops_per_image_measured'] / 1e6:.1f}M "
            f"| {statistics.mean(fids):.2f} ± {sd:.2f} | {paired} "
            f"| {statistics.median(seconds):.3f} | {statistics.median(r['images_per_s'] for r in runs):.1f} |"
            if seconds else
            f"| {method} | {len(runs)} | - | {first['params_total'] / 1e6:.2f}M | {first['params_active'] / 1e6:.2f}M "
            f"| {first['ffn_params_active'] / 1e6:.3f}M | {first['flops_per_image'] / 1e6:.1f}M / "
            f"{first['flops_per_image_measured'] / 1e6:.1f}M | {statistics.mean(fids):.2f} ± {sd:.2f} | | - "
            f"| {statistics.median(r['images_per_s'] for r in runs):.1f} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """FID against activated parameters, one marker per run."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    for method, steps in dict.fromkeys((r["method"], r["train_steps"]) for r in rows):
        runs = [r for r in rows if r["method"] == method and r["train_steps"] == steps]
        label = f"{method} ({steps} steps)" if steps else method
        axis.scatter([r["params_active"] / 1e6 for r in runs], [r["fid"] for r in runs], label=label, alpha=0.8)
    axis.set_xlabel("activated parameters (M)")
    axis.set_ylabel("FID (digits-classifier features)")
    axis.set_yscale("log")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["scratch", "dense2moe"], choices=["scratch", "dense2moe"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scratch-steps", type=int, default=300, help="training steps of each from-scratch model")
    parser.add_argument("--distill-steps", type=int, default=300, help="distillation steps of each student")
    parser.add_argument("--mob-blocks", type=int, default=9, help="blocks each image runs after the MoB stage")
    parser.add_argument("--variants", nargs="*", default=["experts-only"], help="extra Dense2MoE rows: experts-only")
    parser.add_argument("--samples", type=int, default=500, help="images per FID")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--teacher", type=Path, default=None, help="dense teacher .ckpt (default: configs/dit.yaml's)")
    parser.add_argument("--fresh", action="store_true", help="start moe.json afresh instead of adding rows to it")
    parser.add_argument("--report", action="store_true", help="only rewrite moe.md and moe.png from moe.json")
    args = parser.parse_args()
    if args.report:
        return write_report(json.loads((RESULTS / "moe.json").read_text()))
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "moe.json"
    result = {"rows": [], "runs": []} if args.fresh or not path.is_file() else json.loads(path.read_text())
    run = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "loadavg_start": [round(v, 2) for v in os.getloadavg()]}}  # fmt: skip
    started = time.perf_counter()
    teacher = args.teacher or build_from_recipe(TeacherConfig())
    for seed in args.seeds:
        for part in args.parts:
            rows = scratch_runs(seed, args) if part == "scratch" else dense2moe_runs(teacher, seed, args)
            result["rows"].extend(rows)
            path.write_text(json.dumps(result, indent=1))
    run["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    run["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["runs"].append(run)
    path.write_text(json.dumps(result, indent=1))
    write_report(result)


def write_report(result: dict) -> None:
    table = summary_table(result["rows"])
    runs = "\n".join(f"- `{json.dumps(r['settings'])}`: {r['machine']}, {r['wall_seconds']} s" for r in result["runs"])
    (RESULTS / "moe.md").write_text(f"# Mixture of experts on digits\n\n{table}\n\nRuns:\n{runs}\n")
    plot(result["rows"], RESULTS / "moe.png")
    print(table)


if __name__ == "__main__":
    main()
