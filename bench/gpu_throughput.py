"""Training throughput and peak memory of ditlab's DiT against diffusers' ``DiTTransformer2DModel`` on one GPU.

The GPU counterpart of ``bench/core_throughput.py``: both networks hold the same weights
(``ditlab.models.interop.to_diffusers``) and run the same training step (forward under bf16 autocast,
MSE against a fixed target, backward, fused AdamW), eager and with ``torch.compile`` for *both* models.
Throughput is images/s over timed steps after warm-up (CUDA-synchronised), the models interleaved over
repeats; peak memory is ``torch.cuda.max_memory_allocated`` of a training step. Achieved TFLOP/s counts the
step's forward + backward FLOPs with ``torch.utils.flop_counter.FlopCounterMode``.

    python bench/gpu_throughput.py [--configs DiT-S/2 DiT-XL/2] [--out bench/results/gpu_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ditlab.models.config import DiTConfig
from ditlab.models.interop import to_diffusers

HERE = Path(__file__).resolve().parent
BATCH = {"DiT-S/2": 256, "DiT-B/2": 256, "DiT-XL/2": 64}  # 256x256 images as 32x32x4 SD-VAE latents


def build(preset: str, which: str) -> torch.nn.Module:
    torch.manual_seed(0)
    dit = DiTConfig(preset=preset, input_size=32, in_channels=4, num_classes=1000).build()
    model = to_diffusers(dit) if which.startswith("diffusers") else dit
    return model.cuda().train()


def make_step(preset: str, which: str):
    model = build(preset, which)
    batch = BATCH[preset]
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, 4, 32, 32, device="cuda", generator=generator)
    t = torch.randint(0, 1000, (batch,), device="cuda", generator=generator)
    y = torch.randint(0, 1000, (batch,), device="cuda", generator=generator)
    target = torch.randn(batch, 8, 32, 32, device="cuda", generator=generator)
    network = torch.compile(model) if which.endswith("+compile") else model
    if which.startswith("diffusers"):
        forward = lambda: network(x, t, y).sample  # noqa: E731
    else:
        forward = lambda: network(x, t.float(), y)  # noqa: E731
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.mse_loss(forward().float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return model, step, forward, target


def timed(step, count: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(count):
        step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def step_flops(preset: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    _, _, forward, target = make_step(preset, "ours")
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", dtype=torch.bfloat16):
        F.mse_loss(forward().float(), target).backward()
    return counter.get_total_flops()


def measure(preset: str, variants: list[str], warmup: int, steps: int, repeats: int) -> dict:
    steppers, peaks = {}, {}
    for which in variants:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        _, step, _, _ = make_step(preset, which)
        for _ in range(warmup):  # includes compilation
            step()
        torch.cuda.synchronize()
        peaks[which] = torch.cuda.max_memory_allocated() / 2**20
        steppers[which] = step
    seconds = {which: [] for which in variants}
    for repeat in range(repeats):
        order = variants if repeat % 2 == 0 else variants[::-1]
        for which in order:
            seconds[which].append(timed(steppers[which], steps))
    flops = step_flops(preset)
    batch = BATCH[preset]
    rows = {}
    for which in variants:
        best = min(seconds[which])
        rows[which] = {"images_per_s": batch * steps / best,
                       "images_per_s_median": batch * steps / statistics.median(seconds[which]),
                       "tflops": flops * steps / best / 1e12, "peak_memory_mb": peaks[which]}  # fmt: skip
    return {"batch": batch, "train_flops_per_step": flops, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(BATCH), choices=list(BATCH))
    parser.add_argument("--variants", nargs="+", default=["ours", "diffusers", "ours+compile", "diffusers+compile"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results" / "gpu_throughput.json"))
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
               "precision": "bf16 autocast, fused AdamW", "configs": {}}  # fmt: skip
    for preset in args.configs:
        results["configs"][preset] = measure(preset, args.variants, args.warmup, args.steps, args.repeats)
        print(preset, json.dumps(results["configs"][preset]["rows"], indent=1), flush=True)
    lines = ["| config | batch | model | img/s | vs diffusers (same mode) | TFLOP/s | peak MiB |", "|---|---|---|---|---|---|---|"]
    for preset, entry in results["configs"].items():
        rows = entry["rows"]
        for which, row in rows.items():
            twin = "diffusers+compile" if which.endswith("+compile") else "diffusers"
            ratio = row["images_per_s"] / rows[twin]["images_per_s"] if twin in rows else float("nan")
            lines.append(f"| {preset} | {entry['batch']} | {which} | {row['images_per_s']:.0f} | {ratio:.2f}x | "
                         f"{row['tflops']:.0f} | {row['peak_memory_mb']:.0f} |")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
