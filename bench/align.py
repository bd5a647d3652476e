"""Does alignment speed up training? FID-against-step curves of six arms on digits, same network, steps, batch, lr.

Arms (``ditlab.methods.align``): ``vanilla`` (SiT flow matching alone), ``repa`` (projector alignment to the frozen
``digits-vit``), ``haste`` (REPA + attention-map distillation, all alignment off at ``--haste-stop``),
``haste-noterm`` (the same, never switched off), ``reg`` (REPA + the encoder class token entangled and denoised)
and ``self-transcendence`` (phase 2 against a phase-1 teacher of the same network, trained once here on the
selection seed for ``--st-teacher-steps`` steps; its cost is reported, not hidden).

Every arm trains the same SiT (a 4-block, width-64, 4-head digits DiT, patch 4: a 4x4 token grid like the
encoder's; small because the machine is two shared CPU cores) with the SiT objective the papers use (linear path, velocity, uniform t), AdamW ``--lr`` with warm-up,
grad-norm clip 1.0 (REPA's ``max_grad_norm``), EMA ``--ema``, batch ``--batch-size``, for ``--steps`` steps. In-loop
FID (``ditlab.callbacks.evaluation.Evaluation``: ``--samples`` class-balanced samples of the EMA network, digits-
classifier features, which no arm aligns to) every ``--every`` steps with a fixed sampler: Euler ODE, ``--sampling-
steps`` steps, no guidance (the papers' convergence claims are without CFG; SiT's SDE costs the same per step).
Per-arm settings scale the papers' to a 4-block network (aligned block 2, about REPA's 4 of 12; HASTE's
attention blocks 1-2 <- the encoder's last two, as its 5-8 <- DINOv2's 9-12; Self-Transcendence's blocks
1 / 2 / 3 for its 2 / 6 / 8 of 12, guidance stop at a quarter of the run as its 100K of 400K; HASTE's stop at a
third of the run, as ``configs/haste.yaml``). Nothing is tuned on the reported seeds: ``--part select`` (HASTE's
stop) and ``--part diagnose`` run on ``--selection-seed``.

The table: final FID mean ± sd per arm, the step at which each seed's curve first reaches vanilla's mean final
FID (linear interpolation between evaluations) and the speed-up that implies, and training wall time per step
relative to vanilla (so the encoder's cost shows; times are ratios within one run). ``--part diagnose`` adds
HASTE variants on the selection seed (aligned block, loss weight, projector, termination, encoder) when HASTE
misses its target. Rows are appended to ``bench/results/align.json`` as they finish; ``align.md`` / ``align.png``
are rewritten from all rows.

``--testbed scenes`` runs the same comparison on the text-to-image digit scenes (32x32 RGB, captions from a
grammar): a 4-block, width-64 PixArt-alpha network (patch 4: the scene CLIP's 8x8 grid; rectified flow with
logit-normal times as ``configs/pixart.yaml``), arms ``vanilla`` and ``repa`` (block 2 aligned to the patch tokens of
ditlab's digit-aware scene CLIP), Euler with CFG 3 for every evaluation, FID on ``scene-clip-first`` features (the
first recipe's scene CLIP, separately trained, which no arm aligns to) on the validation captions, with CLIP score
and the recognizer's compositional accuracy in every row; ``--final-samples`` adds one larger evaluation at the
end with FID's 95% bootstrap interval. Results go to ``align_scenes.{json,md,png}``.

    python bench/align.py [--testbed digits|scenes] [--part main|select|diagnose|timing] [--arms ...] [--seeds 0 1 2]
                          [--steps 8000] [--report]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from ditlab.analysis import first_reach
from ditlab.atomic import save_text
from ditlab.callbacks.alignment import AlignmentTermination
from ditlab.callbacks.evaluation import Evaluation
from ditlab.data.digits import DigitsDataModule
from ditlab.data.scenes import ScenesDataModule
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.align import (
    AlignModule,
    AttentionAlignConfig,
    CleanAlignConfig,
    EncoderConfig,
    FeatureAlignConfig,
    GuidedAlignConfig,
    PhaseOneTeacherConfig,
    REGModule,
    SelfTranscendenceModule,
)
from ditlab.methods.align.encoders import load_encoder
from ditlab.methods.base import DiffusionModule
from ditlab.metrics.features import cache_root
from ditlab.models.config import DiTConfig
from ditlab.threads import set_threads

sys.path.insert(0, str(Path(__file__).parent))
from moe import StepTimer  # noqa: E402 - wall seconds of every training step

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ARMS = ("vanilla", "repa", "haste", "haste-noterm", "reg", "self-transcendence")


@dataclass(frozen=True)
class Testbed:
    """What differs between the two testbeds: data, network, objective, encoder, aligned block and FID protocol."""

    name: str
    title: str
    network: DiTConfig
    objective: ObjectiveConfig
    encoder: str
    aligned_block: int
    arms: tuple[str, ...]
    evaluation: dict  # Evaluation's reference, features and guidance
    results: str  # stem of the results files

    def data(self, batch_size: int) -> L.LightningDataModule:
        if self.name == "scenes":
            return ScenesDataModule(batch_size=batch_size, image_size=32, captions=True)
        return DigitsDataModule(batch_size=batch_size, image_size=16)


TESTBEDS = {
    "digits": Testbed(
        "digits", "Alignment on digits",
        DiTConfig(preset="digits", input_size=16, depth=4, hidden_size=64, num_heads=4, learn_sigma=False),
        ObjectiveConfig(kind="flow", path="linear", time_sampling="uniform", t_scale=1000.0),
        "digits-vit", 2, ARMS, dict(reference="digits", features="digits-classifier", cfg_scale=1.0), "align",
    ),
    # PixArt-alpha blocks (self-attention, cross-attention to the caption, MLP; adaLN-single) as configs/pixart.yaml,
    # at half its depth and width (4 blocks of 64; patch 4: the scene CLIP's 8x8 grid) so that three seeds of two
    # arms fit a session on two cores
    "scenes": Testbed(
        "scenes", "Alignment on digit scenes (text-to-image)",
        DiTConfig(input_size=32, in_channels=3, patch_size=4, hidden_size=64, depth=4, num_heads=4, learn_sigma=False,
                  block="pixart", block_options={"cross_attention_init": "xavier"}, condition="text",
                  condition_options={"encoder": "scene-clip", "text_dim": 64, "text_length": 32, "projection": "mlp",
                                     "projection_init": "xavier", "adaln": "single", "dropout_prob": 0.1}),
        ObjectiveConfig(kind="flow", path="linear", time_sampling="logit_normal", t_scale=1000.0),
        "scene-clip", 2, ("vanilla", "repa"),
        dict(reference="scenes", features="scene-clip-first", cfg_scale=3.0), "align_scenes",
    ),
}


# ----------------------------------------------------------------------------------------- arms
def feature(args: argparse.Namespace, **changes) -> FeatureAlignConfig:
    values = dict(blocks=[args.bed.aligned_block], weight=0.5, projector="mlp",
                  projector_hidden=4 * args.bed.network.hidden_size, projector_layers=3)  # fmt: skip
    return FeatureAlignConfig(**{**values, **changes})


def attention(**changes) -> AttentionAlignConfig:
    return AttentionAlignConfig(**{**dict(blocks=[1, 2], encoder_blocks=[3, 4], weight=0.5), **changes})


def common(args: argparse.Namespace) -> dict:
    sampling = SamplingConfig(sampler="euler", steps=args.sampling_steps, cfg_scale=args.bed.evaluation["cfg_scale"])
    return dict(network=args.bed.network, objective=args.bed.objective, sampling=sampling, lr=args.lr, warmup_steps=args.warmup,
                ema_decay=args.ema)  # fmt: skip


def build(arm: str, args: argparse.Namespace, variant: dict | None = None) -> tuple[DiffusionModule, list]:
    """The module and extra callbacks of ``arm``; ``variant`` changes HASTE's settings (diagnosis)."""
    variant = dict(variant or {})
    if arm == "vanilla":
        return DiffusionModule(**common(args)), []
    if arm not in args.bed.arms:
        raise ValueError(f"arm {arm!r} is not offered on the {args.bed.name} testbed; choices: {list(args.bed.arms)}")
    if arm == "repa":
        return AlignModule(**common(args), encoder=EncoderConfig(args.bed.encoder), feature=feature(args)), []
    if arm in ("haste", "haste-noterm"):
        stop = variant.pop("stop", args.haste_stop)
        module = AlignModule(**common(args), encoder=EncoderConfig(args.bed.encoder), feature=feature(args, **variant.pop("feature", {})),
                             attention=attention(**variant.pop("attention", {})))  # fmt: skip
        return module, [AlignmentTermination(stop)] if arm == "haste" and stop is not None else []
    if arm == "reg":
        return REGModule(**common(args), feature=feature(args)), []
    if arm == "self-transcendence":
        teacher = st_teacher(args)
        module = SelfTranscendenceModule(
            phase=2, **common(args), clean=CleanAlignConfig(block=1, hidden=4 * args.bed.network.hidden_size),
            guided=GuidedAlignConfig(teacher_block=3, block=2, guidance=30.0, hidden=4 * args.bed.network.hidden_size),
            teacher=PhaseOneTeacherConfig(checkpoint=str(teacher)),
        )  # fmt: skip
        return module, [AlignmentTermination(args.steps // 4)]
    raise ValueError(f"unknown arm {arm!r}; choices: {list(ARMS)}")


def st_teacher(args: argparse.Namespace) -> Path:
    """Self-Transcendence phase 1 on the selection seed, trained once per setting, cached under ``$DITLAB_CACHE``."""
    folder = cache_root(None) / "bench-align"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"st-phase1-{args.st_teacher_steps}-b{args.batch_size}-lr{args.lr:g}-w{args.warmup}-ema{args.ema:g}"
                     f"-s{args.selection_seed}.ckpt")
    if path.is_file():
        return path
    L.seed_everything(args.selection_seed, verbose=False)
    module = SelfTranscendenceModule(phase=1, **common(args), clean=CleanAlignConfig(block=1, hidden=4 * args.bed.network.hidden_size))
    trainer = trainer_for(args.st_teacher_steps, [])
    started = time.perf_counter()
    trainer.fit(module, args.bed.data(args.batch_size))
    trainer.save_checkpoint(path)
    (path.with_suffix(".json")).write_text(json.dumps({"steps": args.st_teacher_steps, "seed": args.selection_seed,
                                                       "seconds": round(time.perf_counter() - started, 1)}))  # fmt: skip
    return path


def trainer_for(steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     gradient_clip_val=1.0, callbacks=callbacks)  # fmt: skip


def run_arm(arm: str, seed: int, args: argparse.Namespace, variant: dict | None = None, label: str | None = None) -> dict:
    """Train one arm for one seed; its FID curve, final FID and wall time per step."""
    L.seed_everything(seed, verbose=False)
    module, callbacks = build(arm, args, variant)
    timer = StepTimer()
    protocol = dict(sampler="euler", steps=args.sampling_steps, seed=0, **args.bed.evaluation)
    curve = Evaluation(every_n_steps=args.every, num_samples=args.samples, **protocol)
    final = [Evaluation(num_samples=args.final_samples, bootstrap=200, **protocol)] if args.final_samples else []
    started = time.perf_counter()
    trainer = trainer_for(args.steps, [timer, curve, *final, *callbacks])
    trainer.fit(module, args.bed.data(args.batch_size))
    row = {"arm": label or arm, "base_arm": arm, "seed": seed, "variant": variant or {}, "steps": args.steps,
           "curve": curve.curve(), "final_fid": curve.curve()[-1][1], "seconds_per_step": timer.median(),
           "metrics": [[step, numbers(metrics)] for step, metrics in curve.history],
           "final": numbers(final[0].last_metrics) if final else None,
           "wall_seconds": round(time.perf_counter() - started, 1),
           "terminated_at": getattr(module, "terminated_at", None),
           "alignment": module.summary.get("alignment", {})}  # fmt: skip
    print(f"{row['arm']:>28} seed {seed}: final FID {row['final_fid']:.2f}, {row['seconds_per_step']:.3f} s/step, "
          f"curve {[round(f, 1) for _, f in curve.curve()]}", flush=True)  # fmt: skip
    return row


def numbers(metrics: dict) -> dict:
    """The metrics worth keeping from one evaluation (FID, its interval, CLIP score, compositional accuracy ...)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | list | tuple) and not isinstance(v, bool)}


def step_times(args: argparse.Namespace) -> dict[str, float]:
    """Seconds per training step of each arm, interleaved round by round in one process so that load drift on a
    shared machine hits every arm alike (forward, backward, AdamW; no Lightning loop, no evaluation)."""
    data = args.bed.data(args.batch_size)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    modules = {}
    for arm in args.arms:
        L.seed_everything(args.selection_seed, verbose=False)
        module, _ = build(arm, args)
        images, labels = module.unpack_batch(batch)
        optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=args.lr)
        modules[arm] = (module, optimizer, images, labels)
    seconds: dict[str, list[float]] = {arm: [] for arm in modules}
    for round_ in range(args.timing_rounds + 1):
        for arm, (module, optimizer, images, labels) in modules.items():
            started = time.perf_counter()
            for _ in range(args.timing_steps):
                loss = module.training_losses(images, labels)["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if round_:  # round 0 warms up (first encoder / teacher load, allocator)
                seconds[arm].append((time.perf_counter() - started) / args.timing_steps)
    return {arm: statistics.median(values) for arm, values in seconds.items()}


# ----------------------------------------------------------------------------------------- analysis
def mean_sd(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def summary_table(rows: list[dict], seeds: set[int], timing: dict | None = None) -> tuple[str, dict]:
    """One line per arm over ``seeds``: final FID, steps to vanilla's final FID, speed-up, relative step time."""
    reported = [r for r in rows if r["seed"] in seeds and not r["variant"]]
    vanilla = [r for r in reported if r["arm"] == "vanilla"]
    if not vanilla:
        return "(no vanilla runs yet)", {}
    target = statistics.mean(r["final_fid"] for r in vanilla)
    steps = vanilla[0]["steps"]
    vanilla_time = statistics.median(r["seconds_per_step"] for r in vanilla)
    own = [first_reach(r["curve"], target) for r in vanilla]
    best = statistics.mean(min(f for _, f in r["curve"]) for r in vanilla)
    reference = statistics.mean(s for s in own if s is not None)  # vanilla's own (mean) first-reach step
    half = steps // 2
    rises = (" (some curves dip below their final value and rise again before the end)"
             if any((first_reach(r["curve"], r["final_fid"]) or steps) < steps for r in vanilla) else "")  # fmt: skip
    by_seed = {r["seed"]: r for r in vanilla}
    lines = [f"Vanilla's final FID (mean of {len(vanilla)} seeds at step {steps}): **{target:.2f}**. Vanilla's own "
             f"curves first reach it at steps {', '.join('never' if s is None else f'{s:.0f}' for s in own)}{rises}, "
             f"so speed-up = vanilla's mean first-reach step ({reference:.0f}) / the arm's "
             f"(against the final step {steps} instead, every number would be {steps / reference:.2f}x larger). "
             f"Vanilla's best FID on its curves (mean of the seeds' minima): **{best:.2f}**. Paired speed-up per "
             "seed: the step at which vanilla of that seed first reaches its own final FID / the step at which the "
             "arm of that seed first reaches it (> 1: the arm is faster; 'never': it does not within the run).", "",
             f"| arm | seeds | final FID (mean ± sd) | FID at step {half} (mean ± sd) | steps to vanilla's final FID "
             "(per seed) | speed-up | paired speed-up per seed | steps to vanilla's best FID (per seed) | step time "
             "vs vanilla: interleaved (`--part timing`; inside the runs) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    numbers = {"vanilla_final_fid": target}
    for arm in [a for a in ARMS if any(r["arm"] == a for r in reported)]:
        runs = sorted((r for r in reported if r["arm"] == arm), key=lambda r: r["seed"])
        finals = [r["final_fid"] for r in runs]
        reach = [first_reach(r["curve"], target) for r in runs]
        reached = [s for s in reach if s is not None]
        per_seed = ", ".join("never" if s is None else f"{s:.0f}" for s in reach)
        to_best = ", ".join("never" if s is None else f"{s:.0f}" for s in (first_reach(r["curve"], best) for r in runs))
        speedup = (f"{reference / statistics.mean(reached):.2f}x" + ("" if len(reached) == len(reach) else
                   f" ({len(reached)}/{len(reach)} seeds reach it)")) if reached else "-"  # fmt: skip
        ratio = statistics.median(r["seconds_per_step"] for r in runs) / vanilla_time
        if timing and arm in timing and "vanilla" in timing:
            ratio_text = f"{timing[arm] / timing['vanilla']:.2f} ({ratio:.2f} in the runs)"
        else:
            ratio_text = f"{ratio:.2f} (in the runs)"
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        middle = [dict(r["curve"])[half] for r in runs if half in dict(r["curve"])]
        paired = {r["seed"]: paired_speedup(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed}
        paired_text = ", ".join(f"s{seed}: " + ("never" if v is None else f"{v:.2f}x") for seed, v in paired.items())
        lines.append(f"| {arm} | {len(runs)} | {statistics.mean(finals):.2f} ± {sd:.2f} | {mean_sd(middle)} | {per_seed} "
                     f"| {speedup} | {paired_text or '-'} | {to_best} | {ratio_text} |")  # fmt: skip
        numbers[arm] = {"final_fid_mean": statistics.mean(finals), "final_fid_sd": sd, "steps_to_vanilla": reach,
                        "paired_speedup": paired, "step_time_ratio": ratio}  # fmt: skip
    return "\n".join(lines), numbers


def paired_speedup(arm: dict, vanilla: dict, at_step: int | None = None) -> float | None:
    """Vanilla's first-reach step of its own FID at ``at_step`` (default: its final FID) over the arm's, same seed
    (None: the arm never reaches it)."""
    target = vanilla["final_fid"] if at_step is None else dict(vanilla["curve"])[at_step]
    own, reach = first_reach(vanilla["curve"], target), first_reach(arm["curve"], target)
    return None if reach is None or own is None else own / reach


def variants_table(rows: list[dict]) -> str:
    """Selection and diagnosis runs, each against vanilla on the same seed when there is one: its final FID, the
    step at which it first reaches vanilla's final FID and the paired speed-up that gives."""
    extra = [r for r in rows if r["variant"] or r["arm"] != r["base_arm"]]
    if not extra:
        return ""
    by_seed = {r["seed"]: r for r in rows if r["arm"] == "vanilla"}
    lines = ["| run | seed | variant | final FID | vanilla final FID (same seed) | steps to that FID | paired speed-up "
             "| FID curve |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in extra:
        base = by_seed.get(r["seed"])
        curve = " ".join(f"{f:.1f}" for _, f in r["curve"])
        if base is None:
            lines.append(f"| {r['arm']} | {r['seed']} | `{json.dumps(r['variant'])}` | {r['final_fid']:.2f} | - | - | - | {curve} |")
            continue
        reach, speedup = first_reach(r["curve"], base["final_fid"]), paired_speedup(r, base)
        lines.append(f"| {r['arm']} | {r['seed']} | `{json.dumps(r['variant'])}` | {r['final_fid']:.2f} "
                     f"| {base['final_fid']:.2f} | {'never' if reach is None else f'{reach:.0f}'} "
                     f"| {'never' if speedup is None else f'{speedup:.2f}x'} | {curve} |")  # fmt: skip
    return "\n".join(lines)


def final_table(rows: list[dict], seeds: set[int]) -> str:
    """Per run, the larger final evaluation (``--final-samples``, 95% bootstrap interval of FID) with the text
    metrics when the testbed has captions: CLIP score and the recognizer's compositional accuracy."""
    runs = sorted((r for r in rows if r["seed"] in seeds and not r["variant"] and r.get("final")),
                  key=lambda r: (ARMS.index(r["base_arm"]), r["seed"]))  # fmt: skip
    if not runs:
        return ""
    keys = [k for k in ("clip_score", "compositional_digit", "compositional_accuracy") if k in runs[0]["final"]]
    lines = [f"Final evaluation on {runs[0]['final']['num_samples']} samples (step {runs[0]['steps']}):", "",
             "| arm | seed | FID (95% bootstrap interval) | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for r in runs:
        f = r["final"]
        low, high = f.get("fid_interval", (math.nan, math.nan))
        lines.append(f"| {r['arm']} | {r['seed']} | {f['fid']:.2f} ({low:.2f}-{high:.2f}) | "
                     + " | ".join(f"{f[k]:.3f}" for k in keys) + " |")  # fmt: skip
    return "\n".join(lines)


def paired_ratios(rows: list[dict], seeds: set[int]) -> dict[str, dict[int, list[float]]]:
    """Per arm and evaluation step, the arm's FID over vanilla's FID of the same seed, one value per seed."""
    reported = [r for r in rows if r["seed"] in seeds and not r["variant"]]
    vanilla = {r["seed"]: dict(r["curve"]) for r in reported if r["arm"] == "vanilla"}
    out: dict[str, dict[int, list[float]]] = {}
    for r in reported:
        if r["arm"] == "vanilla" or r["seed"] not in vanilla:
            continue
        for step, fid in r["curve"]:
            if step in vanilla[r["seed"]]:
                out.setdefault(r["arm"], {}).setdefault(step, []).append(fid / vanilla[r["seed"]][step])
    return out


def levels_table(rows: list[dict], seeds: set[int]) -> str:
    """Paired speed-up to vanilla's quality at a quarter, half, three quarters and the end of its run: for each seed,
    the step at which vanilla reaches its own FID at that step / the step at which the arm reaches it."""
    reported = [r for r in rows if r["seed"] in seeds and not r["variant"]]
    vanilla = {r["seed"]: r for r in reported if r["arm"] == "vanilla"}
    if not vanilla:
        return ""
    steps = next(iter(vanilla.values()))["steps"]
    levels = [step for step, _ in next(iter(vanilla.values()))["curve"] if step in {steps // 4, steps // 2, 3 * steps // 4, steps}]
    lines = ["| arm | " + " | ".join(f"vanilla's FID at step {s}" for s in levels) + " |", "|---|" + "---|" * len(levels)]
    for arm in (a for a in ARMS if a != "vanilla" and any(r["arm"] == a for r in reported)):
        runs = sorted((r for r in reported if r["arm"] == arm and r["seed"] in vanilla), key=lambda r: r["seed"])
        cells = []
        for level in levels:
            values = [paired_speedup(r, vanilla[r["seed"]], level) for r in runs]
            cells.append(", ".join("never" if v is None else f"{v:.2f}x" for v in values))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(rows: list[dict], seeds: set[int], columns: int = 8) -> str:
    """Paired differences: the arm's FID / vanilla's, same seed, mean ± sd over seeds, at evenly spaced steps."""
    ratios = paired_ratios(rows, seeds)
    if not ratios:
        return ""
    steps = sorted({step for by_step in ratios.values() for step in by_step})
    shown = steps[max(len(steps) // columns, 1) - 1 :: max(len(steps) // columns, 1)]
    lines = ["| arm | " + " | ".join(f"step {s}" for s in shown) + " |", "|---|" + "---|" * len(shown)]
    for arm in (a for a in ARMS if a in ratios):
        lines.append(f"| {arm} | " + " | ".join(mean_sd(ratios[arm].get(s, []), 2) for s in shown) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], seeds: set[int], path: Path, bed: Testbed) -> None:
    """FID against step (per arm the mean over seeds, the seeds' min-max as a band), and the paired ratio to
    vanilla's FID of the same seed."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4.8))
    axis, paired = figure.subplots(1, 2)
    ratios = paired_ratios(rows, seeds)
    for arm in ARMS:
        runs = [r for r in rows if r["arm"] == arm and r["seed"] in seeds and not r["variant"]]
        if not runs:
            continue
        steps = [s for s, _ in runs[0]["curve"]]
        values = [[dict(r["curve"]).get(s, math.nan) for r in runs] for s in steps]
        means = [statistics.mean(v) for v in values]
        line, = axis.plot(steps, means, marker="o", markersize=3, label=f"{arm} ({len(runs)} seeds)")
        axis.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.15)
        if arm in ratios:
            xs = sorted(ratios[arm])
            paired.plot(xs, [statistics.mean(ratios[arm][x]) for x in xs], marker="o", markersize=3,
                        color=line.get_color(), label=arm)  # fmt: skip
            paired.fill_between(xs, [min(ratios[arm][x]) for x in xs], [max(ratios[arm][x]) for x in xs],
                                color=line.get_color(), alpha=0.15)  # fmt: skip
    axis.set(xlabel="training step", ylabel=f"FID ({bed.evaluation['features']} features)", yscale="log")
    axis.set_title("FID against step (band: seed min-max)", fontsize=10)
    axis.legend(fontsize=7)
    paired.axhline(1.0, color="grey", lw=0.8)
    paired.set(xlabel="training step", ylabel="arm FID / vanilla FID, same seed")
    paired.set_title("Paired by seed (< 1: the arm is ahead; band: seed min-max)", fontsize=10)
    paired.legend(fontsize=7)
    figure.suptitle(bed.title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write_report(result: dict, seeds: set[int]) -> None:
    bed = TESTBEDS[result.get("testbed", "digits")]
    table, numbers = summary_table(result["rows"], seeds, result.get("step_seconds"))
    result["summary"] = numbers
    variants, final = variants_table(result["rows"]), final_table(result["rows"], seeds)
    paired, levels = paired_table(result["rows"], seeds), levels_table(result["rows"], seeds)
    encoder = result.get("encoder", {})
    runs = "\n".join(f"- `{json.dumps(r['settings'])}`: {r['machine']}, {r['wall_seconds']} s" for r in result["runs"])
    text = (f"# {bed.title}: does it reach vanilla's FID in fewer steps?\n\n{table}\n\n"
            + (f"{final}\n\n" if final else "")
            + (f"Paired by seed: the arm's FID / vanilla's FID of the same seed (mean ± sd over seeds; < 1: the arm "
               f"is ahead at that step).\n\n{paired}\n\n" if paired else "")
            + (f"Paired speed-up to vanilla's quality at points of its run (per seed 0, 1, 2 ...: the step at which "
               f"vanilla of that seed reaches its FID at that step / the step at which the arm of that seed reaches it; "
               f"> 1: faster; 'never': not within the run).\n\n{levels}\n\n" if levels else "")
            + f"Objective: flow matching ({bed.objective.path} path, velocity, {bed.objective.time_sampling} t), as the "
            f"REPA / HASTE / REG papers train. "
            f"Sampler for every FID: Euler ODE, {'no guidance' if bed.evaluation['cfg_scale'] == 1.0 else 'CFG ' + str(bed.evaluation['cfg_scale'])} (see settings). FID features: "
            f"`{bed.evaluation['features']}`. Encoder `{bed.encoder}`: {encoder}.\n\n"
            + (f"## Selection and diagnosis runs (chosen on the selection seed; a chosen variant rerun on the reported seeds)\n\n{variants}\n\n" if variants else "")
            + f"## Runs\n\n{runs}\n")  # fmt: skip
    save_text(text, RESULTS / f"{bed.results}.md")
    plot(result["rows"], seeds, RESULTS / f"{bed.results}.png", bed)
    print(table)
    if variants:
        print(variants)


# ----------------------------------------------------------------------------------------- parts
DIAGNOSES = {  # HASTE variants that each change one thing (label -> (arm, variant))
    "haste default": ("haste", {}),
    "haste attention only": ("haste", {"feature": {"weight": 0.0}}),
    "haste block 1": ("haste", {"feature": {"blocks": [1]}, "attention": {"blocks": [1], "encoder_blocks": [4]}}),
    "haste block 3": ("haste", {"feature": {"blocks": [3]}, "attention": {"blocks": [2, 3], "encoder_blocks": [3, 4]}}),
    "haste weight 1.0": ("haste", {"feature": {"weight": 1.0}, "attention": {"weight": 1.0}}),
    "haste weight 0.1": ("haste", {"feature": {"weight": 0.1}, "attention": {"weight": 0.1}}),
    "haste conv projector": ("haste", {"feature": {"projector": "conv", "spatial_norm": 1.0}}),
}


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default="digits", choices=list(TESTBEDS),
                        help="digits (class-conditional SiT, 16x16) or scenes (text-to-image PixArt, 32x32 digit scenes)")
    parser.add_argument("--part", default="main", choices=["main", "select", "diagnose", "timing"])
    parser.add_argument("--timing-rounds", type=int, default=5, help="interleaved rounds of --part timing")
    parser.add_argument("--timing-steps", type=int, default=5, help="steps per arm and round of --part timing")
    parser.add_argument("--arms", nargs="+", default=None, choices=list(ARMS), help="default: every arm of the testbed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--selection-seed", type=int, default=100, help="the seed settings are chosen on")
    parser.add_argument("--diagnose-seeds", type=int, nargs="+", default=None,
                        help="seeds of --part diagnose (default: the selection seed; the reported seeds rerun a "
                             "variant chosen there, paired with vanilla of the same seed)")  # fmt: skip
    parser.add_argument("--diagnoses", nargs="*", choices=list(DIAGNOSES),
                        default=["haste default", "haste attention only", "haste block 1", "haste block 3", "haste weight 1.0"])
    parser.add_argument("--steps", type=int, default=8000, help="vanilla's FID has stopped improving by then (protocol v2)")
    parser.add_argument("--every", type=int, default=500, help="FID every this many steps")
    parser.add_argument("--samples", type=int, default=2000, help="images per FID of the curve")
    parser.add_argument("--final-samples", type=int, default=0,
                        help="images of one more evaluation at the end, with a bootstrap interval (0: none)")
    parser.add_argument("--sampling-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--haste-stop", type=int, default=None, help="HASTE's termination step (default: a third of the run)")
    parser.add_argument("--haste-stops", type=int, nargs="+", default=None,
                        help="candidates for --part select (default: a quarter and a half of the run)")
    parser.add_argument("--st-teacher-steps", type=int, default=None,
                        help="Self-Transcendence phase-1 steps (default: a quarter of the run)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: ditlab's choice from the free cores)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of align[_scenes].{json,md,png}")
    parser.add_argument("--fresh", action="store_true", help="start align.json afresh instead of adding rows")
    parser.add_argument("--report", action="store_true", help="only rewrite align.md and align.png from align.json")
    args = parser.parse_args()
    RESULTS, args.bed = args.results, TESTBEDS[args.testbed]
    path = RESULTS / f"{args.bed.results}.json"
    args.arms = args.arms or list(args.bed.arms)
    unknown = sorted(set(args.arms) - set(args.bed.arms))
    if unknown and args.part in ("main", "timing") and not args.report:
        parser.error(f"--arms {' '.join(unknown)} not offered on the {args.testbed} testbed; choose from {list(args.bed.arms)}")
    if args.report:
        result = json.loads(path.read_text())
        write_report(result, set(args.seeds))
        path.write_text(json.dumps(result, indent=1))
        return
    args.haste_stop = args.steps // 3 if args.haste_stop is None else args.haste_stop
    args.haste_stops = args.haste_stops or [args.steps // 4, args.steps // 2]
    args.st_teacher_steps = args.st_teacher_steps or args.steps // 4
    why = set_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()} ({why})", flush=True)
    RESULTS.mkdir(exist_ok=True)
    result = {"rows": [], "runs": []} if args.fresh or not path.is_file() else json.loads(path.read_text())
    result["testbed"] = args.testbed
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    run = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "bed"},
           "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "commit": commit.strip(),
                       "loadavg_start": [round(v, 2) for v in os.getloadavg()]}}  # fmt: skip
    encoder = load_encoder(args.bed.encoder)
    result["encoder"] = {**encoder.scores, "dit_grid": args.bed.network.input_size // args.bed.network.patch_size}
    started = time.perf_counter()

    def add(row: dict) -> None:
        result["rows"].append(row)
        path.write_text(json.dumps(result, indent=1))

    if args.part == "main":
        for seed in args.seeds:
            for arm in args.arms:
                add(run_arm(arm, seed, args))
    elif args.part == "timing":
        result["step_seconds"] = step_times(args)
        print(json.dumps(result["step_seconds"]))
    elif args.part == "select":
        seed = args.selection_seed
        if not any(r["arm"] == "vanilla" and r["seed"] == seed for r in result["rows"]):
            add(run_arm("vanilla", seed, args))
        for stop in args.haste_stops:
            add(run_arm("haste", seed, args, {"stop": stop}, label=f"haste stop {stop}"))
    else:
        for seed in args.diagnose_seeds or [args.selection_seed]:
            if not any(r["arm"] == "vanilla" and r["seed"] == seed for r in result["rows"]):
                add(run_arm("vanilla", seed, args))
            for label in args.diagnoses:
                arm, variant = DIAGNOSES[label]
                add(run_arm(arm, seed, args, variant, label=label))
    run["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    run["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["runs"].append(run)
    write_report(result, set(args.seeds) if args.part == "main" else {0, 1, 2})
    path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
