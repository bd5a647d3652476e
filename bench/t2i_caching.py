"""Caching on a text-to-image MM-DiT: one training-free caching row and one learned-router row against the uncached
network, on the digit scenes' validation captions.

For a trained text-conditioned checkpoint (``configs/mmdit.yaml``; a PixArt one is measured the same way), with its
own sampler, steps and guidance (the empty caption as the null condition):

- uncached: the network itself;
- caching: a training-free policy (default ``magcache``, which on an MM-DiT calibrates the magnitude ratio of the
  image rows of the residual as MagCache4FLUX does; ``--cache teacache`` reads the image stream's modulated input of
  the first double-stream block as TeaCache4FLUX does), calibrated on this network;
- learned router: a HarmoniCa router (default; ``--router-mode l2c`` for Learning-to-Cache pairs from the scenes'
  images and captions) trained here on the frozen network, rolled out on digit-scene training captions, exported at its
  threshold to a static plan and sampled through it.

Each row samples the same captions and seeds and reports the throughput in images/s and its speed-up over the uncached
run (wall clock; the median over ``--repeats`` adjacent (uncached, row) pairs in alternating order), the CPU-time
speed-up, the share of the network's branch work computed, the CLIP score (the scene CLIP,
``ditlab.metrics.text_eval.clip_score_of``) and its change from the uncached samples, the FID against the digit
scenes on features neither the network nor the router was tuned on (default ``scene-clip-first``, with a bootstrap
interval), and the paired PSNR against the uncached samples. The adjacent timing pairs sample the first
``--timing-samples`` captions, so a 2,000-caption run is not timed three times over. Writes
``bench/results/t2i_caching.{json,md}`` with the load average at the start and the end.

    python bench/t2i_caching.py RUN/checkpoints/final.ckpt [--num 2000] [--timing-samples 256]
        [--cache magcache --cache-option threshold=0.06] [--router-mode harmonica --router-steps 196 --sparsity 3e-5]
        [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from ditlab.checkpoint import bundle_from_checkpoint
from ditlab.diffusion.cache import CacheConfig
from ditlab.diffusion.images import sample_from_config, sampling_options
from ditlab.methods.sampling.cache_router import CacheRouterModule, ImageErrorProxy, RouterConfig
from ditlab.methods.sampling.caches import build_policy
from ditlab.methods.sampling.caches.plan import Plan
from ditlab.methods.teacher import TeacherConfig
from ditlab.metrics.psnr import paired_psnr as psnr
from ditlab.metrics.text_eval import sample_conditions
from ditlab.models.text.prompts import condition_input

RESULTS = Path(__file__).parent / "results"


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())



def parse_option(text: str) -> tuple[str, object]:
    """``knob=value`` with the value read as JSON when it parses (numbers, lists, true/false), else a string."""
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


class Bench:
    """Samples the benchmark's captions with one model function: images, wall and CPU seconds."""

    def __init__(self, bundle, captions: list[str], device: torch.device, batch: int) -> None:
        self.bundle, self.network, self.captions, self.batch = bundle, bundle.network, captions, batch
        self.features = condition_input(self.network.config, captions, device)
        self.sampling = bundle.sampling
        self.vae = None
        if bundle.vae is not None:
            from ditlab.data.vae import load_vae

            self.vae = load_vae(bundle.vae).to(device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.clamp(-1, 1).cpu()
        from ditlab.data.vae import decode_latents

        return decode_latents(self.vae, latents, self.bundle.latent_scale).clamp(-1, 1).cpu()

    def sample(self, model, count: int | None = None) -> torch.Tensor:
        features = self.features if count is None else self.features[:count]
        return sample_from_config(self.network, self.bundle.objective, self.sampling, features, seed=0, model=model,
                                  decode=self.decode, batch_size=self.batch)  # fmt: skip

    def timed(self, model, count: int | None = None) -> tuple[torch.Tensor, float, float]:
        started_wall, started_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            images = self.sample(model, count)
        return images, time.perf_counter() - started_wall, time.process_time() - started_cpu


def train_router(args, bundle, device: torch.device) -> tuple[Plan, dict]:
    """A router trained on the frozen network with the checkpoint's sampling (its sampler, steps and guidance)."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from ditlab.data.scenes import ScenesDataModule

    network = bundle.network
    sampling = replace(bundle.sampling, cache=CacheConfig())
    config = RouterConfig(mode=args.router_mode, threshold=args.threshold, sparsity=args.sparsity, init="constant",
                          init_value=0.0)  # fmt: skip
    module = CacheRouterModule(TeacherConfig(checkpoint=args.checkpoint), config, sampling=sampling, lr=args.lr,
                               log_router_every=0)  # fmt: skip
    callbacks = []
    if args.router_mode == "harmonica" and args.proxy_samples:  # refreshed every 2 trajectories, as the digits recipe
        from ditlab.methods.sampling.schedule import schedule_times

        options = {k: v for k, v in sampling_options(sampling).items() if k in ("time_grid", "ddim_alpha_to_one", "sde")}
        calls = len(schedule_times(bundle.objective, sampling.sampler, sampling.steps, **options))
        callbacks.append(ImageErrorProxy(every_n_steps=2 * (calls - 1), samples=args.proxy_samples))
    if network.in_channels != 3 or network.input_size not in (32, 64):
        if args.router_mode == "l2c":
            raise SystemExit(f"--router-mode l2c trains on digit-scene images (3 x 32 or 64 pixels); this network takes "
                             f"{network.in_channels} x {network.input_size}: use --router-mode harmonica")  # fmt: skip
        size = 32  # HarmoniCa reads no image: the scenes only drive the loop
    else:
        size = network.input_size
    data = ScenesDataModule(batch_size=args.train_batch, image_size=size, captions=True)
    L.seed_everything(0, verbose=False)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    trainer = L.Trainer(max_steps=args.router_steps, accelerator=accelerator, devices=1,
                        logger=TensorBoardLogger(Path("runs") / "bench_t2i_caching", name=args.router_mode),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, log_every_n_steps=10, callbacks=callbacks)  # fmt: skip
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    plan = module.export()
    policy = Plan(module.teacher.to(device), module.schedule(), plan=plan)
    return policy, {"mode": args.router_mode, "sparsity": args.sparsity, "threshold": args.threshold,
                    "train_steps": args.router_steps, "train_s": seconds, "computed_fraction": plan.computed_fraction}


def measure(bench: Bench, network, model, reference: dict | None, repeats: int, timing: int | None = None) -> dict:
    """Images, throughput (median images/s over its runs) and the wall and CPU speed-ups of ``model`` (medians over
    the first run against the reference's and ``repeats - 1`` more adjacent (uncached, model) pairs on the first
    ``timing`` captions, order alternating, which cancels most of a shared machine's drift)."""
    images, wall, cpu = bench.timed(model)
    result = {"images": images, "wall_s": wall, "cpu_s": cpu, "images_per_s": len(images) / wall}
    if reference is None:
        return result
    walls, cpus, rates = [reference["wall_s"] / wall], [reference["cpu_s"] / cpu], [len(images) / wall]
    for repeat in range(1, repeats):
        pair = [(network, True), (model, False)][:: 1 if repeat % 2 else -1]
        times = {}
        for which, is_reference in pair:
            timed, times[is_reference, "wall"], times[is_reference, "cpu"] = bench.timed(which, timing)
        walls.append(times[True, "wall"] / times[False, "wall"])
        cpus.append(times[True, "cpu"] / times[False, "cpu"])
        rates.append(len(timed) / times[False, "wall"])
    result.update(images_per_s=statistics.median(rates), speedup=statistics.median(walls),
                  cpu_speedup=statistics.median(cpus), wall_ratios=walls)  # fmt: skip
    return result


def clip_of(images: torch.Tensor, captions: list[str], device: torch.device, skip: bool) -> float | None:
    if skip:
        return None
    from ditlab.metrics.text_eval import clip_score_of

    return clip_score_of(images, captions, device=device)["clip_score"]


def fid_of(images: torch.Tensor, args: argparse.Namespace) -> dict:
    """FID against the digit scenes on features no row was tuned on, with its bootstrap interval."""
    if args.skip_clip:
        return {}
    from ditlab.metrics.fid import evaluate_images

    metrics = evaluate_images(images, reference="scenes", features=args.fid_features, bootstrap=args.bootstrap)
    return {"fid": metrics["fid"], "fid_interval": metrics.get("fid_interval")}


def fid_text(row: dict) -> str:
    if row.get("fid") is None:
        return "-"
    low_high = row.get("fid_interval")
    return f"{row['fid']:.2f}" + (f" [{low_high[0]:.2f}, {low_high[1]:.2f}]" if low_high else "")


def markdown(report: dict) -> str:
    lines = [f"# Caching on a text-to-image {report['block']} ({report['num']} validation captions, {report['sampler']} "
             f"{report['steps']} steps, cfg {report['cfg_scale']})", "",
             f"Checkpoint `{report['checkpoint']}`, device {report['device']}, torch threads {report['threads']}. "
             f"Load average at start {report['load_start']}, at end {report['load_end']}. Speed-ups are ratios of "
             f"images/s to the uncached run in this process (median over {report['repeats']} timing(s), adjacent pairs in "
             f"alternating order, pairs on the first {report.get('timing_samples', report['num'])} captions); CLIP "
             "score on the scene CLIP (change: row minus uncached); FID [95% bootstrap interval] against the digit "
             f"scenes on `{report.get('fid_features', '-')}` features; PSNR paired against the uncached samples.", "",
             "| row | method | settings | units computed | images/s | speed-up | CPU-time speed-up | CLIP score | "
             "CLIP change | FID [95%] | PSNR dB |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in report["rows"]:
        clip = "-" if row["clip_score"] is None else f"{row['clip_score']:.2f}"
        change = "-" if row.get("clip_change") is None else f"{row['clip_change']:+.2f}"
        knobs = ", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "-"
        lines.append(f"| {row['row']} | {row['method']} | {knobs} | {row['computed_share']:.0%} | "
                     f"{row['images_per_s']:.2f} | {row.get('speedup', 1.0):.2f}x | {row.get('cpu_speedup', 1.0):.2f}x | "
                     f"{clip} | {change} | {fid_text(row)} | {'-' if row['row'] == 'uncached' else format(row['psnr'], '.1f')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a trained text-conditioned ditlab checkpoint (configs/mmdit.yaml)")
    parser.add_argument("--num", type=int, default=256, help="validation captions sampled per row")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--captions", default="validation", help="'validation' or a file with one caption a line")
    parser.add_argument("--cache", default="magcache", help="the training-free policy of the caching row")
    parser.add_argument("--cache-option", action="append", default=[], metavar="KNOB=VALUE",
                        help="a knob of --cache (repeatable), e.g. threshold=0.1")  # fmt: skip
    parser.add_argument("--router-mode", choices=["harmonica", "l2c"], default="harmonica")
    parser.add_argument("--router-steps", type=int, default=196, help="router optimiser steps (4 trajectories at 50)")
    parser.add_argument("--sparsity", type=float, default=3e-5)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--train-batch", type=int, default=8, help="trajectories (or pairs) per router step")
    parser.add_argument("--proxy-samples", type=int, default=2, help="HarmoniCa's image-error proxy (0: none)")
    parser.add_argument("--repeats", type=int, default=2, help="timings of each row (the first against the uncached "
                        "run, then adjacent (uncached, row) pairs)")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing-samples", type=int, default=256, help="captions of each adjacent timing pair")
    parser.add_argument("--fid-features", default="scene-clip-first", help="FID features (default: the first recipe's "
                        "scene CLIP, which neither the network nor the router saw)")  # fmt: skip
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap rounds of each FID's 95%% interval")
    parser.add_argument("--skip-clip", action="store_true", help="no CLIP score or FID (a smoke run without the scene "
                        "CLIPs)")  # fmt: skip
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default="t2i_caching", help="result file names (.json, .md)")
    args = parser.parse_args()
    report = {"checkpoint": args.checkpoint, "load_start": load_average(), "threads": args.threads,
              "device": args.device, "repeats": args.repeats, "timing_samples": args.timing_samples,
              "fid_features": None if args.skip_clip else args.fid_features}  # fmt: skip
    print(f"load average {report['load_start']}", flush=True)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle = bundle_from_checkpoint(args.checkpoint)
    network = bundle.network.to(device).eval()
    config = network.config
    if not config.text_conditioned:
        raise SystemExit(f"{args.checkpoint} holds a {config.condition}-conditioned network; this bench measures a "
                         "text-to-image one (train configs/mmdit.yaml)")  # fmt: skip
    sampling = bundle.sampling
    sampler = sampling.sampler or bundle.objective.default_sampler
    report.update(block=config.block, num=args.num, sampler=sampler, steps=sampling.steps, cfg_scale=sampling.cfg_scale)
    captions = sample_conditions(config, args.num, args.captions)
    bench = Bench(bundle, captions, device, args.batch)
    with torch.no_grad():
        bench.sample(network, min(args.num, 4))  # warm-up: the first sampling in a process pays one-off costs
    reference = measure(bench, network, network, None, 1)
    clip_reference = clip_of(reference["images"], captions, device, args.skip_clip)
    rows = [{"row": "uncached", "method": "none", "settings": {}, "computed_share": 1.0,
             "images_per_s": reference["images_per_s"], "clip_score": clip_reference,
             **fid_of(reference["images"], args)}]  # fmt: skip
    print(f"uncached: {reference['images_per_s']:.2f} images/s, CLIP {clip_reference}, FID {fid_text(rows[0])}",
          flush=True)

    def add(row: str, method: str, settings: dict, model, extra: dict | None = None) -> None:
        result = measure(bench, network, model, reference, args.repeats, args.timing_samples)
        clip = clip_of(result["images"], captions, device, args.skip_clip)
        work = getattr(model, "computed_share", None)
        rows.append({"row": row, "method": method, "settings": settings, "computed_share": work,
                     "images_per_s": result["images_per_s"], "speedup": result["speedup"],
                     "cpu_speedup": result["cpu_speedup"], "wall_ratios": result["wall_ratios"], "clip_score": clip,
                     "clip_change": None if clip is None else clip - clip_reference,
                     "psnr": psnr(result["images"], reference["images"]), **fid_of(result["images"], args),
                     **(extra or {})})  # fmt: skip
        last = rows[-1]
        print(f"{row} {method} {settings}: {last['images_per_s']:.2f} images/s ({last['speedup']:.2f}x), "
              f"{work:.0%} of the units, CLIP {clip}, FID {fid_text(last)}, PSNR {last['psnr']:.1f} dB", flush=True)  # fmt: skip

    options = dict(parse_option(text) for text in args.cache_option)
    rest = {k: v for k, v in sampling_options(sampling).items()
            if k not in ("sampler", "steps", "cfg_scale", "cfg_channels", "batch_size", "cache")}  # fmt: skip
    cache = build_policy(network, {"policy": args.cache, "options": options}, bundle.objective, sampler, sampling.steps,
                         cfg_scale=sampling.cfg_scale, cfg_channels=sampling.cfg_channels, **rest)  # fmt: skip
    knobs = {name: getattr(cache, name) for name in type(cache).defaults if name not in ("coefficients", "magnitudes")}
    add("caching", args.cache, knobs, cache)
    router, extra = train_router(args, bundle, device)
    add("learned router", args.router_mode, {"beta": args.sparsity, "threshold": args.threshold}, router, extra)
    report["rows"] = rows
    report["load_end"] = load_average()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1, default=float))
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"load average at end {report['load_end']}; wrote {out / args.name}.json and .md")


if __name__ == "__main__":
    main()
