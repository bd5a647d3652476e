"""Efficient attention operators and grafting: what each operator costs per token count, and what grafting keeps.

Part ``ops``: every attention operator of ``ditlab.models.operators`` (and full attention, PyTorch's fused CPU
kernel) on ``q, k, v (1, 2 heads, N, 32)`` for N = 64 .. 16,384 tokens (square grids 8^2 .. 128^2), one thread:
median wall seconds per call and peak resident memory above the process's start (each cell runs in a forked
child, so peaks do not mix), with a per-cell time cap (a cell over the cap ends that operator's sweep). Also the
operator's counted multiply-accumulates (``macs``), FLOPs measured by ``FlopCounterMode`` up to 4,096 tokens (it
does not see CPU's fused SDPA kernel, so full attention measures 0 there), and the log-log slope of time and MACs over the largest sizes:
1 is linear in tokens, 2 quadratic. Block-sparse is timed on reuse calls (its search call is dense by design).

Part ``graft``: on 16x16 digits at patch 2 (64 tokens on an 8x8 grid, 4x the default's; ``configs/dit_tokens64.yaml``,
trained once and cached; a 256-token teacher did not train to usable samples in this machine's budget),
each variant is fine-tuned from the same full-attention teacher for the same number of steps (``--finetune-steps``,
default 2% of the teacher's), per seed, then sampled for FID (digits-classifier features; sample ``i`` of seed
``s`` seeded ``1000 s + i``; the same noise for every variant of a seed):

- ``teacher``: the teacher as trained; ``teacher+ft``: the teacher fine-tuned with the same budget and losses
  (a self-graft), the fair baseline;
- ``clear-r*``: CLEAR local attention in every block at two radii, attention layers only, distilled (no stage 1);
- ``local-50`` / ``local-100`` and ``hyena-50`` / ``hyena-100``: Grafting with stage-1 regression then the
  fine-tune, in half (odd, 1-based) or all of the blocks;
- ``parallel``: blocks paired in parallel (depth halves), stage-1 pair regression then the fine-tune.

Rows go to ``bench/results/attention.json`` as they finish; ``attention.md`` and ``attention.png`` are rewritten.
Times are ratios within one run only (the machine is shared).

    python bench/attention.py [--parts ops graft] [--seeds 0 1 2] [--samples 250] [--max-tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from ditlab.data.digits import DigitsDataModule
from ditlab.methods.graft.module import GraftConfig, GraftDistillConfig, GraftModule
from ditlab.methods.graft.stage1 import Stage1Config
from ditlab.methods.teacher import TeacherConfig, build_from_recipe
from ditlab.metrics.fid import evaluate_images
from ditlab.models.attention import FullAttention
from ditlab.models.budget import flops_per_image
from ditlab.models.operators.block_sparse import BlockSparseAttention
from ditlab.models.operators.cost import attention_operator_flops
from ditlab.models.operators.hierarchical import HierarchicalAttention
from ditlab.models.operators.hyena import HyenaMixer
from ditlab.models.operators.kv_compress import KVCompressAttention
from ditlab.models.operators.local import LocalAttention
from ditlab.models.operators.window import WindowAttention

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

HEADS, HEAD_DIM = 2, 32


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


# ======================================================================================= part ops
def operators() -> dict:
    """Name -> factory of a fresh operator (the ``ops`` sweep)."""
    return {
        "full": FullAttention,
        "local r=3": lambda: LocalAttention(3, kernel="gather"),
        "local r=3 pool=4": lambda: LocalAttention(3, pool=4, kernel="gather"),
        "window w=2 (2d)": lambda: WindowAttention(2, kernel="gather"),
        "window w=8 (raster)": lambda: WindowAttention(8, layout="raster", kernel="gather"),
        "hyena-y 2d": lambda: HyenaMixer(HEADS * HEAD_DIM, variant="y", layout="2d"),
        "hyena-se raster": lambda: HyenaMixer(HEADS * HEAD_DIM, variant="se", layout="raster"),
        "block-sparse 90% <=4 blocks (reuse)": lambda: BlockSparseAttention(0.9, block_size=64, search_every=10**9,
                                                                            max_blocks=4),
        "hierarchical w=8 pool=8": lambda: HierarchicalAttention(8, pool=8),
        "kv-compress r=2": lambda: KVCompressAttention(HEADS * HEAD_DIM, ratio=2),
        "kv-compress r=4": lambda: KVCompressAttention(HEADS * HEAD_DIM, ratio=4),
    }  # fmt: skip


def measure_cell(name: str, tokens: int, budget: float, queue) -> None:
    """In a forked child: median seconds per call and peak RSS growth (MiB) of one operator at ``tokens``."""
    torch.set_num_threads(1)
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    operator = operators()[name]()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, tokens, HEAD_DIM, generator=generator) for _ in range(3))
    with torch.no_grad():
        operator(q, k, v)  # warm-up (block-sparse: its search call; local: its index)
        seconds = []
        while len(seconds) < 5 and (len(seconds) < 2 or sum(seconds) < budget):
            started = time.perf_counter()
            operator(q, k, v)
            seconds.append(time.perf_counter() - started)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss) / 1024
    macs = int(operator.macs(tokens, HEADS, HEAD_DIM)) if hasattr(operator, "macs") else None
    measured = None
    if tokens <= 4096:  # FlopCounterMode sees matmuls, einsums and convolutions (not CPU's fused SDPA kernel)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            operator(q, k, v)
        measured = counter.get_total_flops()
    queue.put({"seconds": statistics.median(seconds), "peak_mib": peak, "macs": macs, "flops_measured": measured,
               "calls": len(seconds)})


def sweep_ops(args: argparse.Namespace) -> list[dict]:
    context = multiprocessing.get_context("fork")
    sizes = [4**i for i in range(3, 8) if 4**i <= args.max_tokens]
    rows = []
    for name in args.operators or operators():
        for tokens in sizes:
            queue = context.Queue()
            child = context.Process(target=measure_cell, args=(name, tokens, args.cell_budget, queue))
            started = time.perf_counter()
            child.start()
            child.join(args.cell_cap)
            if child.is_alive():
                child.kill()
                child.join()
                rows.append({"operator": name, "tokens": tokens, "over_cap": True})
                print(f"ops: {name} at {tokens} tokens ran past the {args.cell_cap:.0f} s cap; larger sizes skipped")
                break
            cell = queue.get() if child.exitcode == 0 else {"error": f"exit code {child.exitcode}"}
            rows.append({"operator": name, "tokens": tokens, **cell, "wall": time.perf_counter() - started})
            print(f"ops: {name:38s} N={tokens:6d} {cell.get('seconds', float('nan')) * 1e3:9.2f} ms "
                  f"{cell.get('peak_mib', float('nan')):8.1f} MiB", flush=True)  # fmt: skip
    return rows


def slopes(rows: list[dict]) -> dict:
    """Log-log slope of seconds and MACs against tokens over each operator's three largest measured sizes."""
    result = {}
    for name in dict.fromkeys(r["operator"] for r in rows):
        cells = [r for r in rows if r["operator"] == name and "seconds" in r][-3:]
        if len(cells) < 2:
            continue

        def slope(key: str, cells: list[dict] = cells) -> float | None:
            points = [(math.log(c["tokens"]), math.log(c[key])) for c in cells if c.get(key)]
            if len(points) < 2:
                return None
            mean_x = sum(x for x, _ in points) / len(points)
            mean_y = sum(y for _, y in points) / len(points)
            return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)

        result[name] = {"time_slope": slope("seconds"), "macs_slope": slope("macs"),
                        "tokens": [c["tokens"] for c in cells]}  # fmt: skip
    return result


# ======================================================================================= part graft
def variants(args: argparse.Namespace) -> dict[str, dict]:
    """Name -> GraftModule options of every fine-tuned variant (same steps, data and lr for all)."""
    local = {"radius": args.graft_radius}
    hyena = {"variant": "y", "layout": "2d"}
    stage1 = Stage1Config(steps=args.stage1_steps, lr=2e-3, batch_size=64, loss="l1",
                          calibration_images=args.calibration_images)  # fmt: skip
    none = Stage1Config(steps=0, calibration_images=args.calibration_images)
    grafting = GraftDistillConfig(trainable="all")
    clear = GraftDistillConfig(trainable="attention")
    table = {"teacher+ft": {"graft": GraftConfig("full", {}, "all"), "stage1": none, "distill": grafting}}
    for radius in args.clear_radii:
        table[f"clear-r{radius:g}"] = {"graft": GraftConfig("local", {"radius": radius}, "all"), "stage1": none,
                                       "distill": clear}  # fmt: skip
    for name, kind, options in (("local", "local", local), ("hyena", "hyena", hyena)):
        for share, blocks in (("50", "odd"), ("100", "all")):
            table[f"{name}-{share}"] = {"graft": GraftConfig(kind, options, blocks), "stage1": stage1,
                                        "distill": grafting}  # fmt: skip
    for share, blocks in (("50", "odd"), ("100", "all")):  # PixArt-Sigma's key/value compression, ratio 2
        table[f"kv-{share}"] = {"graft": GraftConfig("kv-compress", {"ratio": 2}, blocks), "stage1": stage1,
                                "distill": grafting}  # fmt: skip
    table["parallel"] = {"graft": GraftConfig("full", {}, "all", parallel=True), "stage1": stage1, "distill": grafting}
    return table


def finetune(teacher: Path, options: dict, seed: int, steps: int, args: argparse.Namespace) -> tuple[GraftModule, dict]:
    L.seed_everything(seed, verbose=False)
    module = GraftModule(teacher=TeacherConfig(checkpoint=str(teacher)), lr=args.lr, warmup_steps=0,
                         ema_decay=args.ema_decay, **options)  # fmt: skip
    started = time.perf_counter()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=args.batch_size, image_size=16, shuffle_seed=seed))
    info = {"finetune_seconds": time.perf_counter() - started, "stage1": module.summary["graft"]["stage1"]}
    return module, info


@torch.no_grad()
def quality(module: GraftModule, network, seed: int, args: argparse.Namespace) -> dict:
    labels = torch.arange(args.samples) % 10
    started = time.perf_counter()
    images = module.sample(labels, seed=1000 * seed, network=network, sampler="ddim", steps=args.sampling_steps,
                           cfg_scale=args.cfg_scale)  # fmt: skip
    seconds = time.perf_counter() - started
    metrics = evaluate_images(images, reference="digits", features="digits-classifier")
    return {"fid": metrics["fid"], "num_samples": args.samples, "sampling_seconds": seconds}


def costs(network) -> dict:
    tokens = network.x_embedder.num_patches
    return {"blocks": network.depth, "attention": network.config.attention,
            "attention_options": network.config.attention_options, "block_kind": network.config.block,
            "parameters": sum(p.numel() for p in network.parameters()),
            "attention_flops_per_image": attention_operator_flops(network, tokens),
            "flops_per_image": flops_per_image(network)}  # fmt: skip


def run_graft(args: argparse.Namespace, report: dict, save) -> None:
    recipe = TeacherConfig(recipe=str(ROOT / "configs" / "dit_tokens64.yaml"))
    teacher = build_from_recipe(recipe)
    from ditlab.checkpoint import read_checkpoint

    teacher_steps = int(read_checkpoint(teacher)["global_step"])
    steps = args.finetune_steps or max(1, int(0.02 * teacher_steps) - 1)
    report["graft_protocol"] = {"teacher": str(teacher), "teacher_steps": teacher_steps, "finetune_steps": steps,
                                "finetune_share_of_teacher_steps": steps / teacher_steps, "samples": args.samples,
                                "sampler": "ddim", "sampling_steps": args.sampling_steps, "cfg_scale": args.cfg_scale,
                                "batch_size": args.batch_size, "lr": args.lr, "ema_decay": args.ema_decay,
                                "stage1_steps_per_block": args.stage1_steps,
                                "calibration_images": args.calibration_images}  # fmt: skip
    table = variants(args)
    chosen = [name for name in ["teacher", *table] if not args.variants or name in args.variants]
    for seed in args.seeds:
        for name in chosen:
            if any(r["variant"] == name and r["seed"] == seed for r in report["graft"]):
                continue
            if name == "teacher":
                module = GraftModule(teacher=TeacherConfig(checkpoint=str(teacher)), graft=GraftConfig("full", {}, "all"),
                                     ema_decay=None)  # fmt: skip
                network, info = module.teacher, {"finetune_seconds": 0.0, "stage1": {}}
                module.objective = module.objective_config.build(network.learn_sigma)
            else:
                module, info = finetune(teacher, table[name], seed, steps, args)
                network = module.sampling_network  # the EMA weights when --ema-decay is set
            row = {"variant": name, "seed": seed, "finetune_steps": 0 if name == "teacher" else steps, **info,
                   **costs(network), **quality(module, network.eval(), seed, args), "load": load()}  # fmt: skip
            report["graft"].append(row)
            save()
            print(f"graft: seed {seed} {name:12s} FID {row['fid']:.2f} ft {info['finetune_seconds']:.0f}s "
                  f"sample {row['sampling_seconds']:.0f}s load {row['load']}", flush=True)  # fmt: skip


# ======================================================================================= reporting
def summarise(report: dict) -> dict:
    rows = report["graft"]
    table = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        fids = [r["fid"] for r in rows if r["variant"] == name]
        first = next(r for r in rows if r["variant"] == name)
        table[name] = {"fid_mean": statistics.mean(fids), "fid_std": statistics.stdev(fids) if len(fids) > 1 else 0.0,
                       "seeds": len(fids), "attention_flops_per_image": first["attention_flops_per_image"],
                       "flops_per_image": first["flops_per_image"], "blocks": first["blocks"]}  # fmt: skip
    for baseline in ("teacher", "teacher+ft"):
        if baseline in table:
            for entry in table.values():
                entry[f"fid_vs_{baseline}"] = entry["fid_mean"] / table[baseline]["fid_mean"]
    return table


def markdown(report: dict) -> str:
    lines = [f"# Attention operators and grafting ({report['machine']})", ""]
    if report.get("ops"):
        sizes = sorted({r["tokens"] for r in report["ops"]})
        lines += ["## Operator cost vs tokens (1 thread, q/k/v of shape (1, 2 heads, N, 32)): time / peak memory", "",
                  "| operator | " + " | ".join(f"N={n}" for n in sizes) + " | MFLOPs measured / counted (N=4096) | "
                  "time slope | MAC slope |", "|---" * (len(sizes) + 4) + "|"]  # fmt: skip
        for name, fit in report["ops_slopes"].items():
            cells = {r["tokens"]: r for r in report["ops"] if r["operator"] == name}
            values = []
            for n in sizes:
                cell = cells.get(n)
                values.append("over cap" if cell and cell.get("over_cap") else
                              f"{cell['seconds'] * 1e3:.2f} ms / {cell['peak_mib']:.0f} MiB" if cell and "seconds" in cell
                              else "-")  # fmt: skip
            measured = cells.get(4096, {}).get("flops_measured")
            counted = cells.get(4096, {}).get("macs")
            values.append(f"{measured / 1e6:.1f} / {2 * counted / 1e6:.1f}" if measured is not None and counted else "-")
            time_slope = f"{fit['time_slope']:.2f}" if fit["time_slope"] is not None else "-"
            mac_slope = f"{fit['macs_slope']:.2f}" if fit["macs_slope"] is not None else "-"
            lines.append(f"| {name} | " + " | ".join(values) + f" | {time_slope} | {mac_slope} |")
        lines.append("")
    if report.get("graft"):
        protocol = report["graft_protocol"]
        lines += ["## Grafting on 64-token digits (16x16 at patch 2)", "", "```", json.dumps(protocol, indent=1), "```", "",
                  "| variant | FID (mean ± sd) | seeds | / teacher | / teacher+ft | blocks | attention GFLOPs/img | "
                  "GFLOPs/img |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, entry in summarise(report).items():
            lines.append(f"| {name} | {entry['fid_mean']:.2f} ± {entry['fid_std']:.2f} | {entry['seeds']} | "
                         f"{entry.get('fid_vs_teacher', float('nan')):.3f} | {entry.get('fid_vs_teacher+ft', float('nan')):.3f} | "
                         f"{entry['blocks']} | {entry['attention_flops_per_image'] / 1e9:.4f} | "
                         f"{entry['flops_per_image'] / 1e9:.4f} |")  # fmt: skip
    lines += ["", f"Load average at start: {report['load_start']}; at end: {report.get('load_end', '-')}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if report.get("graft") else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    for name in dict.fromkeys(r["operator"] for r in report.get("ops", [])):
        cells = [r for r in report["ops"] if r["operator"] == name and "seconds" in r]
        axes[0].loglog([c["tokens"] for c in cells], [c["seconds"] for c in cells], "o-", label=name)
        axes[1].loglog([c["tokens"] for c in cells], [max(c["peak_mib"], 0.1) for c in cells], "o-", label=name)
    axes[0].set(xlabel="tokens N", ylabel="seconds per call (1 thread)", title="operator time")
    axes[1].set(xlabel="tokens N", ylabel="peak RSS growth (MiB)", title="operator memory")
    axes[0].legend(fontsize=7)
    if panels == 3:
        table = summarise(report)
        names = list(table)
        axes[2].bar(range(len(names)), [table[n]["fid_mean"] for n in names],
                    yerr=[table[n]["fid_std"] for n in names], color="tab:blue")  # fmt: skip
        axes[2].set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        axes[2].set(ylabel="FID (digits classifier)", title="grafting, 64-token digits")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["ops", "graft"], choices=["ops", "graft"])
    parser.add_argument("--operators", nargs="*", default=None, choices=list(operators()),
                        help="ops: sweep only these (their rows replace the old ones; the others are kept)")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--cell-budget", type=float, default=2.0, help="seconds of timed calls per cell (after 2)")
    parser.add_argument("--cell-cap", type=float, default=60.0, help="wall cap per cell; over it ends the sweep")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="*", default=None)
    parser.add_argument("--samples", type=int, default=250)
    parser.add_argument("--sampling-steps", type=int, default=10)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--finetune-steps", type=int, default=0, help="0: 2%% of the teacher's steps, minus one")
    parser.add_argument("--stage1-steps", type=int, default=100)
    parser.add_argument("--calibration-images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ema-decay", type=float, default=0.9, help="EMA of the fine-tune (sampled); <0: none")
    parser.add_argument("--clear-radii", type=float, nargs=2, default=[2.0, 3.0])
    parser.add_argument("--graft-radius", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the graft part (ops cells: 1)")
    parser.add_argument("--fresh", action="store_true", help="start a new attention.json instead of adding to it")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of attention.{json,md,png}")
    args = parser.parse_args()
    args.ema_decay = None if args.ema_decay < 0 else args.ema_decay
    torch.set_num_threads(args.threads)
    results = args.results
    results.mkdir(parents=True, exist_ok=True)
    path = results / "attention.json"
    report = json.loads(path.read_text()) if path.is_file() and not args.fresh else {}
    report.setdefault("graft", [])
    report.update(machine=f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread{'s' if args.threads > 1 else ''}",
                  load_start=load(), command="python bench/attention.py " + " ".join(os.sys.argv[1:]))  # fmt: skip

    def save() -> None:
        path.write_text(json.dumps(report, indent=1))
        (results / "attention.md").write_text(markdown(report))

    if "ops" in args.parts:
        swept = sweep_ops(args)
        kept = [r for r in report.get("ops", []) if args.operators and r["operator"] not in args.operators]
        report["ops"] = kept + [dict(r, load=load()) for r in swept]
        report["ops_slopes"] = slopes(report["ops"])
        save()
    if "graft" in args.parts:
        run_graft(args, report, save)
    report["load_end"] = load()
    save()
    plot(report, results / "attention.png")
    print((results / "attention.md").read_text())


if __name__ == "__main__":
    main()
