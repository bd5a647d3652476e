"""Methods composed: does a feature cache's saving multiply with a pruned, grafted, routed or dynamic model's?

Researchers combine methods (a pruned student that is also cached; a grafted model that is also dynamic). For the
teacher and each method checkpoint given (``name=PATH``: a dicomp student, a grafted model, a Mixture-of-Blocks or
MoE model, a DyDiT model, each trained from that teacher), the bench samples the same class-balanced labels from
the same seeds with every model, uncached and through one feature cache (``--cache``, the policy and knobs
``ditlab sample --cache`` takes), all through ``ditlab``'s one sampling path (``sample_from_config``), and reports
per model and cache state:

- FLOPs per image, counted with ``torch.utils.flop_counter`` over every model call of the first ``--flop-samples``
  samples (routers and the cache's own work included; PyTorch's fused CPU attention kernel is not counted, for
  every row alike);
- wall seconds per image for ``--timed`` images, interleaved (uncached, cached, cached, uncached), best of each;
- FID on digits-classifier features with its 95% basic bootstrap interval, and the paired PSNR of each cached
  sample against the same model's uncached one.

A composition "multiplies" when its FLOPs speed-up over the uncached teacher is within 10% of the product of the
model's own speed-up and the cache's speed-up on the teacher. A cache a model cannot take is a row with the
policy's one-line refusal (the board shows the gap).

Training methods compose too: a model named ``A+B`` is method B applied to a model trained with method A (e.g.
``repa+dicomp``: the dicomp student of a REPA-trained teacher). It is measured against the same ``--teacher`` as
every row, and the board compares its uncached FID with the model named ``B`` (the same compression of the plain
teacher), at the same FLOPs.

    python bench/compose.py --teacher T.ckpt --models pruned=P.ckpt dydit=D.ckpt --cache '{"policy": "fora",
        "options": {"interval": 2}}' [--num 2000] [--sampler ddim] [--steps 50] [--threads 2] [--out bench/results/compose]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from ditlab.atomic import save_text
from ditlab.checkpoint import bundle_from_checkpoint
from ditlab.diffusion.cache import as_cache_config
from ditlab.diffusion.images import model_function, sample_from_config
from ditlab.methods.sampling.caches.work import Counted
from ditlab.metrics.fid import evaluate_images
from ditlab.metrics.psnr import paired_psnr as psnr
from ditlab.threads import machine_record

RESULTS = Path(__file__).parent / "results"
MULTIPLIES = 0.10
"""Relative tolerance of "the savings multiply"."""



class Model:
    """One checkpoint, sampled with the settings it recorded except the bench's sampler, steps and cache."""

    def __init__(self, name: str, path: str, args: argparse.Namespace) -> None:
        bundle = bundle_from_checkpoint(path)
        self.name, self.path, self.bundle = name, path, bundle
        self.sampling = replace(bundle.sampling, sampler=args.sampler or bundle.sampling.sampler,
                                steps=args.steps or bundle.sampling.steps, batch_size=args.batch)  # fmt: skip
        self.parameters = sum(p.numel() for p in bundle.network.parameters())

    def function(self, cache: dict | None):
        """The model function the sampler calls (``cache`` None: uncached); raises the cache's refusal."""
        sampling = replace(self.sampling, cache=as_cache_config(cache))
        return model_function(self.bundle.network, self.bundle.objective, sampling, self.bundle.factory)

    def sample(self, labels: torch.Tensor, model) -> torch.Tensor:
        with torch.no_grad():
            return sample_from_config(self.bundle.network, self.bundle.objective, self.sampling, labels, model=model,
                                      shape=self.bundle.shape)[:, : self.bundle.network.in_channels]  # fmt: skip


def flops_per_image(model: Model, cache: dict | None, labels: torch.Tensor) -> float:
    counted = Counted(model.function(cache))
    model.sample(labels, counted)
    return counted.flops / len(labels)


def wall_per_image(model: Model, cache: dict | None, labels: torch.Tensor) -> tuple[float, float]:
    """Best seconds per image uncached and cached, timed in the order (uncached, cached, cached, uncached); with no
    cache, uncached twice (and nan for the cached time)."""
    times: dict[bool, list[float]] = {False: [], True: [math.nan]}
    for cached in (False, True, True, False) if cache else (False, False):
        function = model.function(cache if cached else None)
        started = time.perf_counter()
        model.sample(labels, function)
        times[cached].append((time.perf_counter() - started) / len(labels))
    return min(times[False]), min(times[True][1:], default=math.nan)


def bench_model(model: Model, cache: dict, args: argparse.Namespace) -> list[dict]:
    labels = torch.arange(args.num) % model.bundle.network.num_classes
    base = {"model": model.name, "checkpoint": model.path, "parameters": model.parameters}
    uncached = model.sample(labels, model.function(None))
    fid = evaluate_images(uncached, bootstrap=args.bootstrap)
    rows = [{**base, "cache": "none", "fid": fid["fid"], "fid_interval": fid.get("fid_interval"),
             "flops": flops_per_image(model, None, labels[: args.flop_samples])}]  # fmt: skip
    try:
        function = model.function(cache)
    except (ValueError, NotImplementedError, TypeError) as error:
        rows.append({**base, "cache": cache["policy"], "refused": str(error).splitlines()[0]})
        print(f"{model.name} + {cache['policy']}: refused ({rows[-1]['refused']})", flush=True)
        rows[0]["wall_s"] = wall_per_image(model, None, labels[: args.timed])[0]
        return rows
    cached = model.sample(labels, function)
    fid = evaluate_images(cached, bootstrap=args.bootstrap)
    rows.append({**base, "cache": cache["policy"], "fid": fid["fid"], "fid_interval": fid.get("fid_interval"),
                 "flops": flops_per_image(model, cache, labels[: args.flop_samples]),
                 "psnr_vs_uncached": psnr(cached.clamp(-1, 1), uncached.clamp(-1, 1))})  # fmt: skip
    rows[0]["wall_s"], rows[1]["wall_s"] = wall_per_image(model, cache, labels[: args.timed])
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "checkpoint"}, default=str), flush=True)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Speed-ups against the uncached teacher, and whether each composition's FLOPs saving multiplies."""
    teacher = {row["cache"]: row for row in rows if row["model"] == "teacher"}
    plain = teacher["none"]
    cache_alone = next((row for key, row in teacher.items() if key != "none" and "flops" in row), None)
    out = []
    for row in rows:
        entry = dict(row)
        if "flops" in row:
            entry["flop_speedup"] = plain["flops"] / row["flops"]
            entry["wall_speedup"] = plain["wall_s"] / row["wall_s"]
            entry["fid_over_teacher"] = row["fid"] / plain["fid"]
        if row["model"] != "teacher" and row["cache"] != "none" and "flops" in row and cache_alone is not None:
            own = next(r for r in rows if r["model"] == row["model"] and r["cache"] == "none")
            expected = (plain["flops"] / own["flops"]) * (plain["flops"] / cache_alone["flops"])
            entry["expected_flop_speedup"] = expected
            entry["multiplies"] = abs(entry["flop_speedup"] / expected - 1) <= MULTIPLIES
        out.append(entry)
    return out


def markdown(report: dict) -> str:
    lines = [f"{report['setup']}", "", "| model | cache | parameters | FLOPs speed-up | expected if multiplied | "
             "multiplies | wall speed-up | FID [95%] | FID / teacher | PSNR vs uncached |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in report["summary"]:
        if "refused" in row:
            lines.append(f"| {row['model']} | {row['cache']} | {row['parameters']:,} | refused: {row['refused']} "
                         "| | | | | | |")  # fmt: skip
            continue
        interval = row.get("fid_interval")
        fid = f"{row['fid']:.2f}" + (f" [{interval[0]:.1f}, {interval[1]:.1f}]" if interval else "")
        expected = f"{row['expected_flop_speedup']:.2f}x" if "expected_flop_speedup" in row else ""
        multiplies = {True: "yes", False: "no"}.get(row.get("multiplies"), "")
        psnr_text = f"{row['psnr_vs_uncached']:.1f} dB" if "psnr_vs_uncached" in row else ""
        lines.append(f"| {row['model']} | {row['cache']} | {row['parameters']:,} | {row['flop_speedup']:.2f}x | "
                     f"{expected} | {multiplies} | {row['wall_speedup']:.2f}x | {fid} | {row['fid_over_teacher']:.2f} | "
                     f"{psnr_text} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_models(pairs: list[str]) -> list[tuple[str, str]]:
    models = []
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"compose.py: error: --models takes NAME=CHECKPOINT pairs; got {pair!r}")
        if name == "teacher":
            raise SystemExit("compose.py: error: 'teacher' names --teacher; give the method models other names")
        models.append((name, path))
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the checkpoint the methods were trained from")
    parser.add_argument("--models", nargs="+", default=[], help="NAME=CHECKPOINT of each method model")
    parser.add_argument("--cache", type=json.loads, default={"policy": "fora", "options": {"interval": 2}},
                        help="the feature cache, as ditlab sample's --cache takes it (JSON)")
    parser.add_argument("--num", type=int, default=2000, help="samples per FID")
    parser.add_argument("--sampler", default=None, help="default: each checkpoint's own")
    parser.add_argument("--steps", type=int, default=None, help="default: each checkpoint's own")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--timed", type=int, default=250, help="images per wall-clock run")
    parser.add_argument("--flop-samples", type=int, default=8)
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap rounds of the FID interval")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "compose")
    args = parser.parse_args()
    if "policy" not in args.cache:
        raise SystemExit('compose.py: error: --cache needs a "policy" (e.g. {"policy": "fora", "options": {"interval": 2}})')
    torch.set_num_threads(args.threads)
    machine = machine_record()
    models = [("teacher", args.teacher), *parse_models(args.models)]
    rows = []
    for name, path in models:  # the report is rewritten after each model, so a stopped run keeps what it measured
        rows += bench_model(Model(name, path, args), args.cache, args)
        write_report(rows, machine, args)


def write_report(rows: list[dict], machine: dict, args: argparse.Namespace) -> None:
    report = {"setup": f"cache {json.dumps(args.cache)}, {args.num} samples per FID, sampler "
                       f"{args.sampler or 'each checkpoint own'}, {args.steps or 'recorded'} steps, "
                       f"{args.threads} torch threads, load {machine['load_average']} at start",
              "load_average_start": machine["load_average"][0] if machine["load_average"] else math.nan,
              "machine_start": machine, "machine_end": machine_record(), "args": vars(args) | {"out": str(args.out)},
              "rows": rows, "summary": summarise(rows)}  # fmt: skip
    save_text(json.dumps(report, indent=1, default=str), args.out.with_name(args.out.name + ".json"))
    save_text(markdown(report), args.out.with_name(args.out.name + ".md"))
    print(markdown(report), flush=True)


if __name__ == "__main__":
    main()
