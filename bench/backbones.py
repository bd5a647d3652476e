"""Backbones and latent spaces beyond the plain DiT, on the digits: training curves per seed, then size, FLOPs,
measured sampling speed and FID of trained checkpoints, each sampled as ``ditlab sample --ckpt`` samples it.

Part ``train`` fits an arm (a config of ``configs/``, optionally with overrides) for ``--steps`` steps per seed with
``ditlab fit``'s own objects (``build_cli(..., run=False)``: the config's module, data, trainer and callbacks) plus
an in-loop FID curve (``Evaluation``: ``--samples`` class-balanced samples of the EMA network, digits-classifier
features, every ``--every`` steps, with the arm's own sampler unless ``--sampler``/``--sampling-steps`` set one for
every arm). Arms:

- ``sit`` (``configs/sit.yaml``, pixel space) and ``rae`` (``configs/rae.yaml``: the same SiT on the frozen digits
  ViT's tokens, decoded by the RAE decoder; Zheng et al., "Diffusion Transformers with Representation Autoencoders",
  2025). The decoder is trained once and cached; its holdout reconstruction scores are copied into every rae row.
- ``ofa-kd`` (``configs/ofa_kd.yaml``: the digits DiT distilled into a DiCo student with OFA-KD's exit heads and
  target enhancement; Hao et al., NeurIPS 2023) and ``output-kd`` (the same run with ``ofa.weight 0, ofa.eps 1``:
  plain output KD in the prediction space).
- ``dit``, ``dico`` (Ai et al., NeurIPS 2025), ``d2it`` (Jia et al., CVPR 2025): their configs as they are.

Part ``speed`` takes trained checkpoints (``name=path``), counts parameters and forward FLOPs per image, times
sampling (median images/s over ``--repeats`` rounds of one ``--timed``-image batch, every checkpoint once per round,
the order rotating), and computes FID on ``--num`` samples with a 95% basic bootstrap interval (``ditlab.metrics.fid.fid_interval``).

Every report records the torch thread count and the load average at the start and the end of each run; rows are
added to ``bench/results/NAME.json`` as they finish (``--name``, default ``backbones``), ``NAME.md`` is rewritten.

    python bench/backbones.py train --arms sit rae --seeds 0 1 2 --steps 2000 --every 250 --samples 1000
    python bench/backbones.py speed dit=TEACHER.ckpt dico=RUN/checkpoints/last.ckpt --num 2000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ditlab.analysis import first_reach
from ditlab.callbacks.evaluation import Evaluation
from ditlab.checkpoint import bundle_from_checkpoint, sample_bundle
from ditlab.metrics.fid import evaluate_images
from ditlab.models.budget import activated_parameter_count, flops_per_image, parameter_count
from ditlab.threads import machine_record

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ARMS = {
    "dit": ["--config", "configs/dit.yaml"],
    "dico": ["--config", "configs/dico.yaml"],
    "d2it": ["--config", "configs/d2it.yaml"],
    "sit": ["--config", "configs/sit.yaml"],
    "rae": ["--config", "configs/rae.yaml"],
    "ofa-kd": ["--config", "configs/ofa_kd.yaml"],
    "output-kd": ["--config", "configs/ofa_kd.yaml", "--model.init_args.ofa.weight", "0",
                  "--model.init_args.ofa.eps", "1"],
}  # fmt: skip


def settle(limit: float, level: float = 1.5) -> None:
    """Wait (at most ``limit`` seconds) until the 1-minute load average is below ``level``, so that an arm run after
    another arm of this process starts at a quiet machine's load, as the protocol asks, not at the previous arm's."""
    deadline = time.monotonic() + limit
    while os.getloadavg()[0] >= level and time.monotonic() < deadline:
        time.sleep(5)


# ------------------------------------------------------------------------------------------------ part train
def train_arm(arm: str, seed: int, args: argparse.Namespace) -> dict:
    from ditlab.lightning_cli import build_cli

    work = Path(args.work)
    name = f"{arm}-s{seed}-{args.steps}"
    argv = [*ARMS[arm], "--seed_everything", str(seed), "--trainer.max_steps", str(args.steps),
            "--trainer.logger.init_args.save_dir", str(work), "--trainer.logger.init_args.name", name]  # fmt: skip
    settle(args.settle)
    load_start = machine_record()["load_average"]
    cli = build_cli(argv, run=False)
    curve = Evaluation(every_n_steps=args.every, num_samples=args.samples, reference="digits",
                     features="digits-classifier", sampler=args.sampler, steps=args.sampling_steps, seed=0)  # fmt: skip
    cli.trainer.callbacks.append(curve)
    started = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    wall = time.perf_counter() - started
    module, run_dir = cli.model, Path(cli.trainer.log_dir)
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda path: path.stat().st_mtime)
    row = {"arm": arm, "seed": seed, "steps": args.steps, "argv": argv, "curve": curve.curve(),
           "final_fid": curve.curve()[-1][1], "samples": args.samples, "sampler": {**asdict(module.sampling),
           **curve.overrides}, "wall_seconds": round(wall, 1), "threads": torch.get_num_threads(),
           "load_start": load_start, "load_end": machine_record()["load_average"], "run_dir": str(run_dir),
           "checkpoint": str(checkpoints[-1]) if checkpoints else None,
           "parameters": parameter_count(module.network)}  # fmt: skip
    rae = getattr(module, "rae_folder", None)
    if rae is not None and (Path(rae) / "rae.json").is_file():
        row["rae"] = json.loads((Path(rae) / "rae.json").read_text())
    print(f"[backbones] {arm} seed {seed}: final FID {row['final_fid']:.2f} in {wall:.0f} s, curve "
          f"{[round(f, 1) for _, f in curve.curve()]}", flush=True)  # fmt: skip
    return row


def train_table(rows: list[dict]) -> list[str]:
    """Final FID per arm (mean +- sd over seeds) and the steps at which each seed reaches a paired arm's final FID."""
    lines = ["| arm | steps | seeds | final FID (mean +- sd) | per seed | wall per run (s) | load at start |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    arms = list(dict.fromkeys((r["arm"], r["steps"]) for r in rows))
    finals = {}
    for arm, steps in arms:
        mine = sorted((r for r in rows if r["arm"] == arm and r["steps"] == steps), key=lambda r: r["seed"])
        fids = [r["final_fid"] for r in mine]
        finals[arm, steps] = statistics.mean(fids)
        spread = statistics.stdev(fids) if len(fids) > 1 else 0.0
        lines.append(f"| {arm} | {steps} | {len(mine)} | {finals[arm, steps]:.2f} +- {spread:.2f} | "
                     f"{', '.join(f'{f:.2f}' for f in fids)} | {statistics.mean(r['wall_seconds'] for r in mine):.0f} |"
                     f" {', '.join(str(r['load_start'][0]) for r in mine)} |")  # fmt: skip
    pairs = [("rae", "sit"), ("ofa-kd", "output-kd")]
    for arm, baseline in pairs:
        for steps in sorted({s for a, s in arms if a == arm}):
            if (baseline, steps) not in finals:
                continue
            mine = {r["seed"]: r for r in rows if r["arm"] == arm and r["steps"] == steps}
            theirs = {r["seed"]: r for r in rows if r["arm"] == baseline and r["steps"] == steps}
            paired = [(seed, mine[seed]["final_fid"] - theirs[seed]["final_fid"]) for seed in sorted(mine) if seed in theirs]
            lines += ["", f"`{arm}` - `{baseline}` final FID per seed (paired, {steps} steps): "
                      + ", ".join(f"seed {seed}: {difference:+.2f}" for seed, difference in paired)]  # fmt: skip
            if all(len(r["curve"]) > 1 for r in mine.values()):
                level = finals[baseline, steps]
                reach = [(seed, first_reach(r["curve"], level)) for seed, r in sorted(mine.items())]
                lines.append(f"Steps at which `{arm}` first reaches `{baseline}`'s mean final FID {level:.2f} (of {steps}): "
                             + ", ".join(f"seed {s}: {'not reached' if at is None else f'{at:.0f}'}" for s, at in reach))  # fmt: skip
    return lines


# ------------------------------------------------------------------------------------------------ part speed
def labelled(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep:
        raise SystemExit(f"speed: give checkpoints as name=path (got {text!r})")
    return name, path


def timed_sampling(bundle, labels: torch.Tensor) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        sample_bundle(bundle, labels, seed=0)
    return time.perf_counter() - started


def speed(args: argparse.Namespace) -> list[dict]:
    load_start = machine_record()["load_average"]
    runs = [labelled(text) for text in args.checkpoints]
    bundles = {name: bundle_from_checkpoint(path) for name, path in runs}
    rows = {}
    for name, path in runs:
        bundle = bundles[name]
        network, sampling = bundle.network.eval(), bundle.sampling
        rows[name] = {"name": name, "checkpoint": path, "block": network.config.block, "trunk": network.config.trunk,
                      "tokens": network.x_embedder.num_patches, "sampler": sampling.sampler, "steps": sampling.steps,
                      "cfg_scale": sampling.cfg_scale, "parameters": parameter_count(network),
                      "activated_parameters": activated_parameter_count(network),
                      "flops_per_image": flops_per_image(network), "seconds": []}  # fmt: skip
    labels = torch.arange(args.timed) % 10
    for name in bundles:  # one warm-up image each: one-time costs fall on no clock
        timed_sampling(bundles[name], labels[:1])
    names = list(bundles)
    for round_ in range(args.repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            rows[name]["seconds"].append(timed_sampling(bundles[name], labels))
            print(f"[backbones] round {round_ + 1}/{args.repeats} {name}: "
                  f"{args.timed / rows[name]['seconds'][-1]:.2f} images/s", flush=True)  # fmt: skip
    for name, row in rows.items():
        row["images_per_s"] = statistics.median(args.timed / s for s in row["seconds"])
        started = time.perf_counter()
        images = sample_bundle(bundles[name], torch.arange(args.num) % 10, seed=0, progress=f"[backbones] {name}")
        row["fid_sampling_s"] = round(time.perf_counter() - started, 1)
        metrics = evaluate_images(images, reference="digits", features="digits-classifier", bootstrap=200)
        row.update(fid=metrics["fid"], fid_interval=metrics["fid_interval"], num=args.num,
                   precision=metrics.get("precision"), recall=metrics.get("recall"))  # fmt: skip
        print(f"[backbones] {name}: FID {row['fid']:.2f} {row['fid_interval']}", flush=True)
    for row in rows.values():
        row.update(threads=torch.get_num_threads(), load_start=load_start, load_end=machine_record()["load_average"])
    return list(rows.values())


def speed_table(rows: list[dict]) -> list[str]:
    lines = ["| run | block / trunk | tokens | sampler | parameters | FLOPs/image (M) | images/s | FID [95% bootstrap] | "
             "samples | load start -> end |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        low, high = row["fid_interval"]
        lines.append(f"| {row['name']} | {row['block']} / {row['trunk']} | {row['tokens']} | {row['sampler']} "
                     f"{row['steps']}, cfg {row['cfg_scale']} | {row['parameters'] / 1e6:.2f} M | "
                     f"{row['flops_per_image'] / 1e6:.2f} | {row['images_per_s']:.1f} | {row['fid']:.2f} "
                     f"[{low:.2f}, {high:.2f}] | {row['num']} | {row['load_start'][0]} -> {row['load_end'][0]} |")  # fmt: skip
    return lines


# ------------------------------------------------------------------------------------------------ report
def markdown(report: dict) -> str:
    lines = [f"# {report['name']}", ""]
    if report["train"]:
        lines += ["## Training curves (digits-classifier FID of the EMA network)", "", *train_table(report["train"]), ""]
    for group, rows in report["speed"].items():
        lines += [f"## Speed and quality: {group}", "",
                  f"torch threads {rows[0]['threads']}; images/s: median of a {rows[0].get('timed', '')} batch "
                  "over rounds, order rotating.", "", *speed_table(rows), ""]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["train", "speed", "report"])
    parser.add_argument("checkpoints", nargs="*", help="speed: name=path of trained .ckpt files")
    parser.add_argument("--arms", nargs="+", default=["sit", "rae"], choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=500, help="train: FID every N steps (and at the end)")
    parser.add_argument("--samples", type=int, default=1000, help="train: samples per FID point")
    parser.add_argument("--sampler", default=None, help="train: one sampler for every arm (default: the arm's)")
    parser.add_argument("--sampling-steps", type=int, default=None)
    parser.add_argument("--num", type=int, default=2000, help="speed: samples per checkpoint for FID")
    parser.add_argument("--timed", type=int, default=64, help="speed: images in the timed batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--group", default="backbones", help="speed: the name of this comparison in the report")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settle", type=float, default=180.0,
                        help="train: wait up to S seconds before each arm for the load average to fall below 1.5")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-backbones"), help="train: run folders")
    parser.add_argument("--name", default="backbones")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / f"{args.name}.json"
    report = json.loads(path.read_text()) if path.is_file() else {"name": args.name, "train": [], "speed": {}}

    def save() -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))
        (RESULTS / f"{args.name}.md").write_text(markdown(report))

    if args.part == "train":
        for seed in args.seeds:
            for arm in args.arms:
                report["train"] = [r for r in report["train"]
                                   if not (r["arm"] == arm and r["seed"] == seed and r["steps"] == args.steps)]
                report["train"].append(train_arm(arm, seed, args))
                save()
    elif args.part == "speed":
        rows = speed(args)
        for row in rows:
            row["timed"] = args.timed
        report["speed"][args.group] = rows
        save()
    save()
    print(markdown(report))


if __name__ == "__main__":
    main()
