"""Learned caching on the digits teacher: HarmoniCa and Learning-to-Cache routers (a sparsity-weight sweep) and Inner
Loop Feedback, trained here on the frozen teacher, then sampled with the caching benchmark's protocol.

The protocol is ``bench/caching.py``'s, imported from it: the same teacher, class-balanced labels and seeds, DDIM at
20 steps with the teacher's guidance, speed-up in CPU time, wall time and counted FLOPs against the uncached run in
this process (full-equivalent NFE = steps / FLOPs speed-up), FID on digits-classifier features and the paired PSNR
against the uncached samples. FORA rows are re-run in this process as the training-free reference; the other
training-free rows are read from ``bench/results/caching.json`` (their speed-ups are against that run's own uncached
timing). The best learned row within 5% FID is then timed in adjacent (uncached, cached) pairs.

Targets (issue 20): learned caching with at least 2x fewer full-equivalent NFE at FID within 5% of uncached, and a
strictly better FID than the best training-free policy at the same measured speed-up (FLOPs speed-up at least the
learned row's, within 5%).

    python bench/learned_caching.py [--num 500] [--sparsity 1e-5 3e-5 1e-4] [--teacher PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from caching import RESULTS, Run, knob_text, load_average, row_of, timed  # noqa: E402 - the caching protocol

from ditlab.checkpoint import bundle_from_checkpoint  # noqa: E402
from ditlab.data.digits import DigitsDataModule  # noqa: E402
from ditlab.diffusion.config import SamplingConfig  # noqa: E402
from ditlab.methods.sampling.cache_router import CacheRouterModule, ImageErrorProxy, RouterConfig  # noqa: E402
from ditlab.methods.sampling.caches import build_policy  # noqa: E402
from ditlab.methods.sampling.caches.plan import Plan  # noqa: E402
from ditlab.methods.sampling.feedback import FeedbackConfig, FeedbackModule  # noqa: E402
from ditlab.methods.teacher import TeacherConfig  # noqa: E402
from ditlab.metrics.features import feature_extractor  # noqa: E402

STEPS = 20


def train(module, steps: int, batch: int, image_size: int, root: Path, name: str, callbacks=()) -> float:
    """Fit ``module`` for ``steps`` optimiser steps (TensorBoard under ``root/name``); returns CPU seconds."""
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(root, name=name),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, log_every_n_steps=10, callbacks=list(callbacks))  # fmt: skip
    started = time.process_time()
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=batch, image_size=image_size))
    return time.process_time() - started


def router(args, mode: str, sparsity: float, root: Path, image_size: int, cfg_scale: float) -> tuple[object, dict]:
    sampling = SamplingConfig(sampler="ddim", steps=STEPS, cfg_scale=cfg_scale)
    config = RouterConfig(mode=mode, threshold=args.threshold, sparsity=sparsity, init="constant",
                          init_value=args.init_value)  # fmt: skip
    module = CacheRouterModule(TeacherConfig(checkpoint=args.teacher), config, sampling=sampling, lr=args.lr,
                               log_router_every=STEPS - 1)  # fmt: skip
    callbacks = [ImageErrorProxy(every_n_steps=args.proxy_every, samples=args.proxy_samples)] if mode == "harmonica" else []
    steps = args.router_steps if mode == "harmonica" else args.pair_steps
    train_s = train(module, steps, args.train_batch, image_size, root, f"{mode}_{sparsity:g}", callbacks)
    plan = module.export()
    policy = Plan(module.teacher, module.schedule(), plan=plan)
    return policy, {"mode": mode, "sparsity": sparsity, "threshold": args.threshold, "train_steps": steps,
                    "train_cpu_s": train_s, "computed_fraction": plan.computed_fraction, "plan": plan.compute,
                    "scores": module.router.scores().detach().cpu().tolist()}  # fmt: skip


def feedback(args, root: Path, image_size: int, cfg_scale: float) -> tuple[object, dict]:
    sampling = SamplingConfig(sampler="ddim", steps=STEPS, cfg_scale=cfg_scale)
    config = FeedbackConfig(source=args.ilf_source, interval=args.ilf_interval)
    module = FeedbackModule(TeacherConfig(checkpoint=args.teacher), config, sampling=sampling, lr=args.ilf_lr)
    train_s = train(module, args.ilf_steps, args.train_batch, image_size, root, "ilf")
    return module.model_function(), {"mode": "ilf", "train_steps": args.ilf_steps, "train_cpu_s": train_s,
                                     "gamma": module.feedback.gamma.item()}  # fmt: skip


def training_free_rows(path: Path, teacher: str) -> list[dict]:
    """The 20-step ditlab rows of ``bench/caching.py``'s report, marked with their source run."""
    if not path.is_file():
        return []
    report = json.loads(path.read_text())
    same = Path(report.get("teacher", "")).resolve() == Path(teacher).resolve()
    return [{**row, "source": "caching.json" + ("" if same else " (other teacher)")} for row in report["rows"]
            if row.get("steps") == STEPS and row.get("source") == "ditlab" and row["policy"] != "none"
            and "refused" not in row]  # fmt: skip


def verdict(rows: list[dict]) -> list[dict]:
    """Per learned row: the 2x / 5% target, and the best training-free FID at an equal or higher FLOPs speed-up."""
    free = [r for r in rows if r["source"] in ("ditlab", "caching.json") and r["policy"] not in ("none",)]
    checks = []
    for row in (r for r in rows if r["source"] == "learned"):
        rivals = [r for r in free if r["flop_speedup"] >= 0.95 * row["flop_speedup"]]
        best = min(rivals, key=lambda r: r["fid"], default=None)
        checks.append({"policy": row["policy"], "knobs": row["knobs"], "flop_speedup": row["flop_speedup"],
                       "fid_change": row["fid_change"], "two_x_within_5pct": row["flop_speedup"] >= 2.0 and
                       row["fid_change"] <= 0.05, "best_training_free": best and {k: best[k] for k in (
                           "source", "policy", "knobs", "flop_speedup", "fid", "fid_change")},
                       "beats_training_free": best is not None and row["fid"] < best["fid"]})  # fmt: skip
    return checks


def fid_text(row: dict) -> str:
    """The row's FID with its 95% bootstrap interval where the run measured one."""
    low_high = row.get("fid_interval")
    return f"{row['fid']:.3f}" + (f" [{low_high[0]:.1f}, {low_high[1]:.1f}]" if low_high else "")


def markdown(report: dict) -> str:
    lines = [f"# Learned caching on the digits teacher ({report['num']} samples, DDIM {STEPS} steps, cfg "
             f"{report['cfg_scale']})", "", f"Load average at start {report['load_start']}, at end {report['load_end']}; "
             f"torch threads {report.get('threads', 1)}. Speed-ups are ratios to the uncached run of the same process (caching.json rows: to "
             "that run's own uncached timing). On a shared machine the wall time of single rows follows the load "
             "(the uncached row ran at the highest), so read CPU time, FLOPs and the interleaved wall-clock pairs "
             "below. Training cost is CPU seconds.", "",
             "| source | policy | knobs | units computed | CPU-time speed-up | wall speed-up | FLOPs speed-up | "
             "full-eq. NFE | FID [95%] | FID change | PSNR dB | train CPU-s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in report["rows"]:
        computed = row.get("computed_fraction", row.get("work_share"))
        cells = [row["source"], row["policy"], knob_text(row), "-" if computed is None else f"{computed:.0%}",
                 f"{row['cpu_speedup']:.2f}x", f"{row['wall_speedup']:.2f}x", f"{row['flop_speedup']:.2f}x",
                 f"{STEPS / row['flop_speedup']:.1f}", fid_text(row), f"{row['fid_change']:+.1%}",
                 f"{row['psnr']:.1f}", f"{row['train_cpu_s']:.0f}" if "train_cpu_s" in row else "-"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Targets", "", "| learned row | FLOPs speed-up | FID change | >= 2x within 5% FID | best "
              "training-free at >= 0.95x its speed-up | its FID change | learned FID strictly better |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for check in report["verdict"]:
        best = check["best_training_free"]
        rival = f"{best['source']} {best['policy']} {knob_text(best)} ({best['flop_speedup']:.2f}x)" if best else "none"
        lines.append(f"| {check['policy']} {knob_text(check)} | {check['flop_speedup']:.2f}x | {check['fid_change']:+.1%}"
                     f" | {'yes' if check['two_x_within_5pct'] else 'no'} | {rival} | "
                     f"{best['fid_change']:+.1%} | {'yes' if check['beats_training_free'] else 'no'} |" if best else
                     f"| {check['policy']} {knob_text(check)} | {check['flop_speedup']:.2f}x | {check['fid_change']:+.1%}"
                     f" | {'yes' if check['two_x_within_5pct'] else 'no'} | none | - | - |")  # fmt: skip
    for check in report.get("interleaved", []):
        lines += ["", f"Interleaved wall clock ({check['samples']} samples, {len(check['wall_ratios'])} adjacent pairs, "
                  f"order alternating): {check['policy']} {knob_text(check)} {check['wall_speedup']:.2f}x wall "
                  f"(each {', '.join(f'{w:.2f}' for w in check['wall_ratios'])}), {check['cpu_speedup']:.2f}x CPU time."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    markers = {"learned": "o", "ditlab": "s", "caching.json": "^"}
    for row in report["rows"]:
        if row["policy"] == "none":
            continue
        source = row["source"].split(" ")[0]
        axis.scatter(row["flop_speedup"], 100 * row["fid_change"], marker=markers.get(source, "x"),
                     color="C3" if source == "learned" else "C0", s=36)  # fmt: skip
        axis.annotate(f"{row['policy']} {knob_text(row)}", (row["flop_speedup"], 100 * row["fid_change"]), fontsize=6)
    axis.axhline(5, color="grey", lw=0.8, ls=":")
    axis.axvline(2, color="grey", lw=0.8, ls=":")
    axis.set(xlabel="FLOPs speed-up vs uncached", ylabel="FID change vs uncached (%)",
             title=f"DDIM {STEPS} steps: learned (red circles) vs training-free (blue); target: right of and below the lines")  # fmt: skip
    axis.title.set_fontsize(8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="a ditlab checkpoint (default: the configs/dit.yaml recipe)")
    parser.add_argument("--num", type=int, default=500, help="samples per row (FID, PSNR, timing)")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--flop-samples", type=int, default=10)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4], help="HarmoniCa beta sweep")
    parser.add_argument("--l2c-sparsity", type=float, nargs="*", default=[3e-5])
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--init-value", type=float, default=0.0)
    parser.add_argument("--router-steps", type=int, default=95, help="HarmoniCa steps (19 per trajectory)")
    parser.add_argument("--pair-steps", type=int, default=120, help="L2C pair steps")
    parser.add_argument("--proxy-every", type=int, default=38)
    parser.add_argument("--proxy-samples", type=int, default=2)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--ilf-source", type=int, default=9)
    parser.add_argument("--ilf-interval", type=int, default=3)
    parser.add_argument("--ilf-steps", type=int, default=100)
    parser.add_argument("--ilf-lr", type=float, default=1e-3)
    parser.add_argument("--no-ilf", dest="ilf", action="store_false")
    parser.add_argument("--no-fora", dest="fora", action="store_false", help="skip the in-process FORA rows")
    parser.add_argument("--timing-samples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (recorded in the results)")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap rounds of each FID's 95%% interval")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 samples, tiny training")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default="learned_caching", help="result file names (.json, .md, .png)")
    args = parser.parse_args()
    if args.quick:
        args.num, args.batch, args.flop_samples, args.router_steps, args.pair_steps = 40, 40, 2, 19, 10
        args.sparsity, args.l2c_sparsity, args.ilf_steps, args.timing_samples, args.repeats = [1e-5], [1e-5], 6, 20, 1
    torch.set_num_threads(args.threads)
    if args.teacher is None:
        from ditlab.methods.teacher import build_from_recipe

        args.teacher = str(build_from_recipe(TeacherConfig()))
    bundle = bundle_from_checkpoint(args.teacher)
    network, objective, cfg_scale = bundle.network.eval(), bundle.objective, bundle.sampling.cfg_scale
    out, name = Path(args.out), f"{args.name}_quick" if args.quick else args.name
    root = Path("runs") / f"bench_{args.name}"
    report = {"teacher": args.teacher, "num": args.num, "cfg_scale": cfg_scale, "sampler": "ddim", "steps": STEPS,
              "threads": args.threads, "load_start": load_average(), "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": []}  # fmt: skip
    print(f"load average {report['load_start']}", flush=True)
    labels = torch.arange(args.num) % network.num_classes
    run = Run(network, objective, labels, STEPS, cfg_scale, args.batch, args.flop_samples,
              feature_extractor("digits-classifier"), bootstrap=args.bootstrap)  # fmt: skip
    with torch.no_grad():
        run.sample(network, labels[:10])  # warm-up
    reference = run(network)
    rows, models = [row_of("none", {}, reference, reference, "ditlab")], [network]
    print(f"uncached: FID {reference['fid']:.3f}", flush=True)

    def add(model, name: str, knobs: dict, source: str, extra: dict | None = None) -> None:
        row = row_of(name, knobs, run(model), reference, source, extra)
        rows.append(row)
        models.append(model)
        print(f"{source} {name} {knobs}: {row['cpu_speedup']:.2f}x CPU, {row['flop_speedup']:.2f}x FLOPs, FID "
              f"{row['fid']:.3f} ({row['fid_change']:+.1%}), PSNR {row['psnr']:.1f}", flush=True)  # fmt: skip

    for interval in (2, 3) if args.fora else ():
        add(build_policy(network, {"policy": "fora", "options": {"interval": interval}}, objective, "ddim", STEPS, cfg_scale), "fora",
            {"interval": interval}, "ditlab")  # fmt: skip
    size = network.input_size
    for mode, sweep in (("harmonica", args.sparsity), ("l2c", args.l2c_sparsity)):
        for sparsity in sweep:
            policy, extra = router(args, mode, sparsity, root, size, cfg_scale)
            add(policy, mode, {"beta": sparsity}, "learned", {k: v for k, v in extra.items() if k not in ("plan", "scores")})
            rows[-1]["plan"], rows[-1]["scores"] = extra["plan"], extra["scores"]
    if args.ilf:
        policy, extra = feedback(args, root, size, cfg_scale)
        add(policy, "ilf", {"source": args.ilf_source, "interval": args.ilf_interval}, "learned", extra)
    report["rows"] = rows + training_free_rows(RESULTS / "caching.json", args.teacher)
    report["verdict"] = verdict(report["rows"])
    eligible = [r for r in rows if r["source"] == "learned" and r["fid_change"] <= 0.05]
    if eligible:  # the fastest learned row within 5% FID, timed in adjacent pairs against the uncached network
        best = max(eligible, key=lambda r: r["flop_speedup"])
        timing = Run(network, objective, labels[: args.timing_samples], STEPS, cfg_scale, args.timing_samples, 0, None)
        model = models[rows.index(best)]
        wall, cpu = [], []
        for repeat in range(args.repeats):
            pair = [(network, True), (model, False)][:: 1 if repeat % 2 == 0 else -1]
            times = {is_reference: timed(timing, which) for which, is_reference in pair}
            wall.append(times[True][0] / times[False][0])
            cpu.append(times[True][1] / times[False][1])
        report["interleaved"] = [{"policy": best["policy"], "knobs": best["knobs"], "samples": args.timing_samples,
                                  "wall_speedup": statistics.median(wall), "cpu_speedup": statistics.median(cpu),
                                  "wall_ratios": wall, "cpu_ratios": cpu}]  # fmt: skip
    report["load_end"] = load_average()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=float))
    (out / f"{name}.md").write_text(markdown(report))
    plot(report, out / f"{name}.png")
    print(markdown(report))
    print(f"load average at end {report['load_end']}; wrote {out / name}.json, .md and .png")
    if math.isnan(reference["fid"]):
        print("warning: FID is nan (too few samples)")


if __name__ == "__main__":
    main()
