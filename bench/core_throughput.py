"""Training throughput and peak memory of ditlab's DiT against diffusers' ``DiTTransformer2DModel``.

Both networks hold the same weights (``ditlab.models.interop.to_diffusers``) and run the same training
step: forward, MSE against a fixed target, backward, AdamW step. Throughput is measured in one process
with the models interleaved over repeats (alternating order), as wall-clock images/s and as images
per CPU-second of this process (``time.process_time``; with one thread that is the load-robust figure
on a shared machine). Peak memory is the rise of peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` just before training) over the RSS before the first step, in a fresh
subprocess per model with glibc's mmap threshold fixed at 64 KiB so freed tensors leave RSS at once. Achieved FLOP/s counts the step's forward+backward FLOPs with
``torch.utils.flop_counter.FlopCounterMode``; the peak is the best of a few 4096^3 float32 matmuls,
timed the same two ways.

    python bench/core_throughput.py [--threads 1] [--variants compile bf16] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ditlab.models.dit import DiT
from ditlab.models.interop import to_diffusers

HERE = Path(__file__).resolve().parent
CONFIGS = {
    # configs/dit.yaml: digits 16x16x1, patch 4, hidden 128, depth 12, 4 heads, batch 128
    "digits": {"dit": {"input_size": 16, "patch_size": 4, "in_channels": 1, "hidden_size": 128, "depth": 12,
                       "num_heads": 4, "num_classes": 10}, "batch": 128},
    # DiT-S/2 on 32x32x4 latents (256x256 images through the SD VAE), a modest batch for a CPU
    "DiT-S/2": {"dit": {"input_size": 32, "patch_size": 2, "in_channels": 4, "hidden_size": 384, "depth": 12,
                        "num_heads": 6, "num_classes": 1000}, "batch": 8},
}  # fmt: skip


def build(config: str, which: str) -> torch.nn.Module:
    """``ours``, ``diffusers`` (same weights), or a variant of ours: ``ours+compile`` (``torch.compile``),
    ``ours+bf16`` (bfloat16 autocast)."""
    torch.manual_seed(0)
    dit = DiT(**CONFIGS[config]["dit"])
    model = to_diffusers(dit) if which == "diffusers" else dit
    return model.train()


def batch_for(config: str) -> tuple[torch.Tensor, ...]:
    spec = CONFIGS[config]
    size, channels, batch = spec["dit"]["input_size"], spec["dit"]["in_channels"], spec["batch"]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    y = torch.randint(0, spec["dit"]["num_classes"], (batch,), generator=generator)
    target = torch.randn(batch, 2 * channels, size, size, generator=generator)
    return x, t, y, target


def make(config: str, which: str) -> tuple[torch.nn.Module, Callable[[], None]]:
    """The model and a closure running one training step on a fixed batch."""
    model = build(config, which)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x, t, y, target = batch_for(config)
    if which == "diffusers":
        forward = lambda: model(x, t, y).sample  # noqa: E731
    else:
        network = torch.compile(model, dynamic=False) if which == "ours+compile" else model
        precision = torch.bfloat16 if which == "ours+bf16" else torch.float32
        forward = lambda: network_call(network, precision, x, t, y)  # noqa: E731

    def step() -> None:
        loss = F.mse_loss(forward(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return model, step


def network_call(network, precision: torch.dtype, x, t, y) -> torch.Tensor:
    with torch.autocast("cpu", dtype=precision, enabled=precision != torch.float32):
        return network(x, t.float(), y).float()


def step_flops(config: str) -> int:
    """Forward + backward FLOPs of one training step of our DiT (AdamW's update not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(config, "ours")
    x, t, y, target = batch_for(config)
    with FlopCounterMode(display=False) as counter:
        F.mse_loss(model(x, t.float(), y), target).backward()
    return counter.get_total_flops()


def timed(fn: Callable[[], None], count: int = 1) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``count`` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def matmul_peak(size: int = 4096, repeats: int = 5) -> dict[str, float]:
    """Best float32 FLOP/s of a ``size``-cubed matmul, per wall second and per CPU second."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    times = [timed(lambda: torch.matmul(a, b)) for _ in range(repeats)]
    flops = 2 * size**3
    return {"wall": flops / min(w for w, _ in times), "cpu": flops / min(c for _, c in times)}


def throughput(config: str, models: list[str], repeats: int, steps: int) -> dict[str, dict[str, list[float]]]:
    """Images per wall second and per CPU second for each repeat, models interleaved."""
    runners = {which: make(config, which)[1] for which in models}
    for run in runners.values():  # warm-up: compilation, oneDNN primitives, AdamW state
        run()
        run()
    batch = CONFIGS[config]["batch"]
    rates = {which: {"wall": [], "cpu": []} for which in models}
    for repeat in range(repeats):
        for which in models if repeat % 2 == 0 else models[::-1]:
            wall, cpu = timed(runners[which], steps)
            rates[which]["wall"].append(batch * steps / wall)
            rates[which]["cpu"].append(batch * steps / cpu)
    return rates


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak RSS (``VmHWM``; ``ru_maxrss`` would include the forking parent's RSS)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def memory_child(config: str, which: str, steps: int) -> None:
    """In a fresh process: print the peak-RSS rise over the RSS before training."""
    _, run = make(config, which)
    before = rss_bytes()
    with open("/proc/self/clear_refs", "w") as clear:  # "5" resets the peak-RSS mark to the current RSS
        clear.write("5")
    for _ in range(steps):
        run()
    peak = peak_rss_bytes()
    print(json.dumps({"rss_before": before, "peak_rss": peak, "training_peak": peak - before}))


def peak_memory(config: str, which: str, threads: int, steps: int = 3) -> dict[str, int]:
    command = [sys.executable, __file__, "--memory-child", config, which, "--steps", str(steps)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=HERE.parent, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def profile(config: str, which: str, steps: int = 3) -> str:
    _, run = make(config, which)
    run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def table(results: dict) -> str:
    rows = ["| config | batch | model | params | img/s (wall) | img per CPU-s | vs diffusers (CPU-s) | "
            "training peak MiB | GFLOP per CPU-s | share of fp32 matmul peak |",
            "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, entry in results["configs"].items():
        for which, row in entry["models"].items():
            rows.append(f"| {name} | {entry['batch']} | {which} | {row['parameters'] / 1e6:.2f}M | "
                        f"{row['images_per_s']:.1f} | {row['images_per_cpu_s']:.1f} | {row['speedup_cpu']:.2f}x | "
                        f"{row['training_peak_mib']:.0f} | {row['gflops_per_cpu_s']:.1f} | "
                        f"{100 * row['share_of_peak']:.0f}% |")  # fmt: skip
    machine = results["machine"]
    rows.append("")
    rows.append(f"{machine['cpu']}, {machine['threads']} torch thread(s); float32 4096^3 matmul peak "
                f"{machine['matmul_peak_gflops_cpu']:.0f} GFLOP per CPU-second ({machine['matmul_peak_gflops_wall']:.0f} "
                f"per wall second); load average {machine['loadavg_start'][0]} at start, {machine['loadavg_end'][0]} "
                f"at end (other processes share this CPU, so wall figures are noisy); torch {machine['torch']}, "
                f"diffusers {machine['diffusers']}. Medians of {results['repeats']} interleaved repeats of "
                f"{results['steps_per_repeat']} steps. FLOPs are our DiT's forward+backward; the diffusers model "
                "does the same matmuls plus its per-block embedder copies.")  # fmt: skip
    return "\n".join(rows)


def write_readme(text: str) -> None:
    readme = HERE / "README.md"
    start, end = "<!-- core_throughput:start -->", "<!-- core_throughput:end -->"
    block = f"{start}\n{text}\n{end}"
    content = readme.read_text() if readme.is_file() else "# Benchmarks\n\nRun by hand; each writes bench/results/<name>.json.\n"  # fmt: skip
    if start in content:
        content = content[: content.index(start)] + block + content[content.index(end) + len(end) :]
    else:
        content = content.rstrip() + f"\n\n## core_throughput\n\n`python bench/core_throughput.py`: DiT vs diffusers' DiTTransformer2DModel, training.\n\n{block}\n"  # fmt: skip
    readme.write_text(content)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed repeat")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--variants", nargs="*", default=[], choices=["compile", "bf16"],
                        help="also time our DiT under torch.compile and/or bfloat16 autocast")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="print the top ops of each model")
    parser.add_argument("--memory-child", nargs=2, metavar=("CONFIG", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.steps)
        return 0
    import diffusers

    threads = torch.get_num_threads()
    models = ["ours", "diffusers", *(f"ours+{variant}" for variant in args.variants)]
    load_start = os.getloadavg()
    peak = matmul_peak()
    results: dict = {"repeats": args.repeats, "steps_per_repeat": args.steps, "configs": {}}
    for name in args.configs:
        rates = throughput(name, models, args.repeats, args.steps)
        flops_per_image = step_flops(name) / CONFIGS[name]["batch"]
        entry: dict = {"batch": CONFIGS[name]["batch"], "dit": CONFIGS[name]["dit"],
                       "train_flops_per_image": flops_per_image, "models": {}}  # fmt: skip
        for which in models:
            memory = peak_memory(name, which, threads)
            cpu_rate = statistics.median(rates[which]["cpu"])
            entry["models"][which] = {
                "parameters": sum(p.numel() for p in build(name, which).parameters() if p.requires_grad),
                "images_per_s": statistics.median(rates[which]["wall"]), "images_per_cpu_s": cpu_rate,
                "repeats_wall": rates[which]["wall"], "repeats_cpu": rates[which]["cpu"],
                "training_peak_mib": memory["training_peak"] / 2**20, "peak_rss_mib": memory["peak_rss"] / 2**20,
                "gflops_per_cpu_s": flops_per_image * cpu_rate / 1e9,
                "share_of_peak": flops_per_image * cpu_rate / peak["cpu"],
            }  # fmt: skip
        base = entry["models"]["diffusers"]["images_per_cpu_s"]
        for row in entry["models"].values():
            row["speedup_cpu"] = row["images_per_cpu_s"] / base
            row["speedup_wall"] = row["images_per_s"] / entry["models"]["diffusers"]["images_per_s"]
        results["configs"][name] = entry
        for which, row in entry["models"].items():
            print(f"{name} {which}: {row['images_per_s']:.1f} img/s, {row['images_per_cpu_s']:.1f} img/CPU-s "
                  f"({row['speedup_cpu']:.2f}x diffusers), training peak {row['training_peak_mib']:.0f} MiB, "
                  f"{100 * row['share_of_peak']:.0f}% of matmul peak", flush=True)  # fmt: skip
        if args.profile:
            for which in models:
                print(f"--- {name} / {which}\n{profile(name, which)}", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())  # fmt: skip
    results["machine"] = {"cpu": f"{cpu} ({os.cpu_count()} cores)", "threads": threads,
                          "matmul_peak_gflops_wall": peak["wall"] / 1e9, "matmul_peak_gflops_cpu": peak["cpu"] / 1e9,
                          "loadavg_start": [round(v, 2) for v in load_start],
                          "loadavg_end": [round(v, 2) for v in os.getloadavg()], "torch": torch.__version__,
                          "diffusers": diffusers.__version__}  # fmt: skip
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "core_throughput.json").write_text(json.dumps(results, indent=2))
    write_readme(table(results))
    print(f"wrote {HERE / 'results' / 'core_throughput.json'} and the table in {HERE / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
