"""Training throughput and peak memory per process: 1 vs 2 processes (DDP, FSDP2), compile and activation
checkpointing on and off, through the real ``ditlab fit`` command.

Each variant is one ``python -m ditlab fit --config configs/dit.yaml`` run (the digits DiT: 12 blocks, width
128, global batch 64) for ``--steps`` steps. Images/s is the median of ``train/images_per_s`` over the logged
intervals after the first two (those include compilation and warm-up); memory per process comes from a
second, 4-step run with glibc's mmap threshold at 64 KiB (freed tensors leave the RSS at once; that setting
slows training, hence two runs): ``summary.json``'s ``peak_memory_mb`` during training (resident set size on CPU, so it includes ~1 GiB of
loaded libraries; allocated memory on GPU) and ``training_memory_rise_mb``, the peak's rise over the memory
in use when training started (weights, gradients, optimiser state, activations). Every variant uses
all the machine's cores: one process with ``--threads`` threads, or that many processes with one thread each.
On a GPU (``--accelerator gpu``) the runs use bf16 autocast and the table adds MFU: 3 x forward FLOPs per
image x images/s over ``--peak-tflops``.

    python bench/scaling.py [--network digits|S/2] [--steps 80] [--batch 64] [--accelerator gpu --peak-tflops 989]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ditlab.analysis import scalar_series

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRAINER = ROOT / "configs" / "trainer"
NETWORKS = {
    "digits": [],  # configs/dit.yaml as it is: 16x16x1, patch 4, width 128, 12 blocks, 16 tokens
    "S/2": ["--data.init_args.image_size", "32", "--model.init_args.network.patch_size", "2",  # DiT-S/2 widths,
            "--model.init_args.network.hidden_size", "384", "--model.init_args.network.num_heads", "6"],  # 256 tokens
}  # fmt: skip
VARIANTS = {
    "1 process": {"processes": 1, "args": []},
    "1 process + activation checkpointing": {"processes": 1,
                                             "args": ["--model.init_args.activation_checkpointing", "true"]},
    "1 process + compile": {"processes": 1, "args": ["--model.init_args.compile", "true"]},
    "2 processes DDP": {"processes": 2, "args": ["--config", str(TRAINER / "ddp.yaml")]},
    "2 processes FSDP2": {"processes": 2, "args": ["--config", str(TRAINER / "fsdp.yaml"),
                                                   "--trainer.strategy.init_args.param_dtype", "null",
                                                   "--trainer.strategy.init_args.reduce_dtype", "null"]},
    "2 processes FSDP2 + activation checkpointing": {
        "processes": 2, "args": ["--config", str(TRAINER / "fsdp.yaml"), "--model.init_args.activation_checkpointing",
                                 "true", "--trainer.strategy.init_args.param_dtype", "null",
                                 "--trainer.strategy.init_args.reduce_dtype", "null"]},
}  # fmt: skip


def run_variant(name: str, steps: int, global_batch: int, threads: int, accelerator: str, out: Path,
                network: str = "digits") -> dict:  # fmt: skip
    variant = VARIANTS[name]
    processes = variant["processes"]
    gpu = accelerator == "gpu"
    command = [sys.executable, "-m", "ditlab", "fit", "--config", str(ROOT / "configs" / "dit.yaml"), *NETWORKS[network], *variant["args"],
               "--trainer.accelerator", accelerator, "--trainer.devices", str(processes),
               "--trainer.precision", "bf16-mixed" if gpu and "FSDP" not in name else "32-true",
               "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", str(max(1, steps // 8)),
               "--trainer.val_check_interval", str(10 * steps), "--trainer.num_sanity_val_steps", "0",
               "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
               "--data.init_args.batch_size", str(global_batch // processes),
               "--trainer.logger.init_args.save_dir", str(out)]  # fmt: skip
    if gpu and "FSDP" in name:  # bf16 compute through the FSDP policy instead of autocast
        command += ["--trainer.strategy.init_args.param_dtype", "bfloat16",
                    "--trainer.strategy.init_args.reduce_dtype", "float32"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // processes)), "PYTHONWARNINGS": "ignore"}
    speed = subprocess.run(command, env=env, cwd=out.parent, capture_output=True, text=True)
    # memory in a second, short run where glibc returns freed tensors to the OS at once (so the RSS peak is the
    # real one); that allocator setting costs throughput, hence two runs
    memory_out = out.parent / "memory"
    memory_command = [*command, "--trainer.max_steps", "4", "--trainer.logger.init_args.save_dir", str(memory_out)]
    memory = subprocess.run(memory_command, env={**env, "MALLOC_MMAP_THRESHOLD_": "65536"}, cwd=out.parent,
                            capture_output=True, text=True)  # fmt: skip
    for done in (speed, memory):
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    run = next(out.glob("dit/version_*"))
    summary = json.loads((run / "summary.json").read_text())
    memory_summary = json.loads(next(memory_out.glob("dit/version_*/summary.json")).read_text())
    rates = [value for _, value in scalar_series(run, "train/images_per_s")][2:]
    return {"processes": processes, "threads_per_process": max(1, threads // processes),
            "images_per_s": statistics.median(rates) if rates else summary["train_images_per_s"],
            "wall_time_s": summary["wall_time_s"], "parameters": summary["parameters"],
            "peak_memory_mb": memory_summary.get("peak_memory_mb"),
            "training_memory_rise_mb": memory_summary.get("training_memory_rise_mb")}  # fmt: skip


def forward_flops_per_image(network: str) -> int:
    from ditlab.models.budget import flops_per_image
    from ditlab.models.dit import DiT

    sizes = {"digits": dict(input_size=16, patch_size=4, hidden_size=128, num_heads=4),
             "S/2": dict(input_size=32, patch_size=2, hidden_size=384, num_heads=6)}  # fmt: skip
    return flops_per_image(DiT(in_channels=1, depth=12, num_classes=10, **sizes[network]))


def table(results: dict, meta: dict) -> str:
    base = results.get("1 process", {}).get("images_per_s")
    head = "| variant | processes x threads | img/s | vs 1 process | peak MiB per process | training rise MiB |"
    rule = "|---|---|---|---|---|---|"
    if meta.get("peak_tflops"):
        head, rule = head + " MFU |", rule + "---|"
    lines = [head, rule]
    for name, row in results.items():
        if "error" in row:
            lines.append(f"| {name} | | failed: {row['error'][:80]} | | |")
            continue
        ratio = f"{row['images_per_s'] / base:.2f}x" if base else ""
        memory = ", ".join(f"{m:.0f}" for m in row["peak_memory_mb"] or [])
        rise = ", ".join(f"{m:.0f}" for m in row.get("training_memory_rise_mb") or [])
        line = (f"| {name} | {row['processes']} x {row['threads_per_process']} | {row['images_per_s']:.1f} | {ratio} "
                f"| {memory} | {rise} |")  # fmt: skip
        if meta.get("peak_tflops"):
            line += f" {3 * meta['forward_flops_per_image'] * row['images_per_s'] / (meta['peak_tflops'] * 1e12):.1%} |"
        lines.append(line)
    lines.append("")
    lines.append(f"{meta['network']} network; {meta['machine']}; torch {meta['torch']}; {meta['steps']} steps at "
                 f"global batch {meta['batch']}; "
                 f"load average {meta['load_before']:.2f} before, {meta['load_after']:.2f} after.")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="digits", choices=list(NETWORKS))
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="cores shared by each variant's processes")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (H100 bf16: 989)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, name in enumerate(args.variants):
            out = Path(scratch) / f"variant{index}" / "runs"
            out.parent.mkdir(parents=True)
            results[name] = run_variant(name, args.steps, args.batch, args.threads, args.accelerator, out, args.network)
            print(name, results[name], flush=True)
    meta = {"machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), {args.accelerator}",
            "torch": torch.__version__, "steps": args.steps, "batch": args.batch, "load_before": load_before,
            "load_after": os.getloadavg()[0], "peak_tflops": args.peak_tflops,
            "forward_flops_per_image": forward_flops_per_image(args.network), "network": args.network}  # fmt: skip
    name = ("scaling" if args.accelerator == "cpu" else "scaling_gpu") + ("" if args.network == "digits" else "_s2")
    (HERE / "results" / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (HERE / "results" / f"{name}.md").write_text(table(results, meta) + "\n")
    print(table(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
