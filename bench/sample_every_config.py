"""Every shipped config's run is samplable from the command line: a short fit of each ``configs/*.yaml``, then
``ditlab sample`` on its final checkpoint, and for router runs ``ditlab export`` and the command it prints, run as
printed. Writes the table (config -> command -> exit code) to ``bench/results/sample_every_config.md``.

    OMP_NUM_THREADS=1 python bench/sample_every_config.py --teacher T.ckpt [--work DIR] [NAME ...]

The fits are tiny (``--steps`` training steps, end-of-run reports on a few images at a few steps) so the table
checks the sampling path, not quality. ``--teacher`` (a short ``configs/dit.yaml`` run) stands in for the cached
teacher recipe of the configs that start from one; a config whose fit already finished in ``--work`` is reused.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_ONLY = {"dit_imagenet256": "needs ImageNet latents, the SD-VAE and 8 GPUs"}
"""Configs that cannot run on a fresh clone offline, with the reason the table gives."""


def shrink(config: dict, steps: int, teacher: str, path: Path) -> dict:
    """The config (to be written at ``path``) cut to a quick look: ``steps`` training steps, reports on 8 images at 5
    steps, one-row grids, validation on one batch, the given teacher file instead of the ``configs/dit.yaml`` recipe
    (a teacher built from the config itself, Self-Transcendence's phase 1, is built from the cut config)."""
    trainer = config.setdefault("trainer", {})
    trainer.update(max_steps=steps, limit_val_batches=1)
    if trainer.get("val_check_interval"):
        trainer["val_check_interval"] = steps
    for callback in trainer.get("callbacks") or []:
        options = callback.get("init_args") or {}
        if "num_samples" in options:
            options.update(num_samples=8, steps=min(options.get("steps") or 5, 5))
        if "per_class" in options:
            options["per_class"] = 1
        if "samples" in options:  # HarmoniCa's image-error proxy
            options["samples"] = 1
    model = config.get("model", {}).get("init_args", {})
    entry = model.get("teacher")
    if isinstance(entry, dict) and entry.get("recipe", "configs/dit.yaml") == "configs/dit.yaml":
        entry["checkpoint"] = teacher
    elif isinstance(entry, dict):
        entry["recipe"] = str(path)
        if "steps" in entry:
            entry["steps"] = steps
    return config


def run(command: list[str], log: Path) -> tuple[int, float, str]:
    """Exit code, seconds and output of ``command`` (output also written to ``log``)."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = done.stdout + done.stderr
    log.write_text(" ".join(map(shlex.quote, command)) + "\n" + output)
    return done.returncode, time.perf_counter() - started, output


def final_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("**/checkpoints/final.ckpt"), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def check_config(name: str, args: argparse.Namespace) -> list[dict]:
    """Rows of the table for one config: its fit, ``ditlab sample``, and for exportable runs export + printed command."""
    work = Path(args.work) / name
    work.mkdir(parents=True, exist_ok=True)
    ckpt = final_checkpoint(work / "runs")
    rows = []
    if ckpt is None:
        config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        config = shrink(config, args.steps, args.teacher, work / "config.yaml")
        (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        command = ["ditlab", "fit", "--config", str(work / "config.yaml"), "--trainer.default_root_dir",
                   str(work / "runs"), "--trainer.logger.init_args.save_dir", str(work / "runs")]  # fmt: skip
        code, seconds, output = run(command, work / "fit.log")
        rows.append({"step": "fit", "command": f"ditlab fit --config configs/{name}.yaml (shrunk)", "rc": code,
                     "s": seconds, "note": last_line(output) if code else ""})  # fmt: skip
        ckpt = final_checkpoint(work / "runs")
        if ckpt is None:
            return rows
    sample = ["ditlab", "sample", "--ckpt", str(ckpt), "--num", "4", "--out", str(work / "samples")]
    code, seconds, output = run(sample, work / "sample.log")
    rows.append({"step": "sample", "command": " ".join(sample[:4]) + " --num 4 --out DIR", "rc": code, "s": seconds,
                 "note": sampled_with(output) if code == 0 else last_line(output)})  # fmt: skip
    exported = work / "export.out"
    code, seconds, output = run(["ditlab", "export", "--ckpt", str(ckpt), "--out", str(exported)], work / "export.log")
    if code == 0:
        rows.append({"step": "export", "command": f"ditlab export --ckpt {ckpt} --out {exported}", "rc": code,
                     "s": seconds, "note": ""})  # fmt: skip
        for printed in re.findall(r"`(ditlab sample [^`]*)`", output):
            command = [*shlex.split(printed), "--num", "4", "--out", str(work / "exported_samples")]
            code, seconds, result = run(command, work / "printed.log")
            rows.append({"step": "printed by export", "command": printed + " --num 4 --out DIR", "rc": code,
                         "s": seconds, "note": sampled_with(result) if code == 0 else last_line(result)})  # fmt: skip
    return rows


def last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def sampled_with(output: str) -> str:
    found = [line for line in output.splitlines() if line.startswith("sampling ")]
    return found[0] if found else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="config names (default: every configs/*.yaml)")
    parser.add_argument("--teacher", required=True, help="a short configs/dit.yaml run's final.ckpt")
    parser.add_argument("--work", default="/tmp/sample_every_config")
    parser.add_argument("--steps", type=int, default=4, help="training steps of each fit")
    parser.add_argument("--out", default=str(ROOT / "bench/results/sample_every_config.md"))
    args = parser.parse_args()
    names = args.names or sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))
    lines = ["| config | step | command | rc | s | note |", "|---|---|---|---|---|---|"]
    failed = 0
    for name in names:
        if name in OFFLINE_ONLY:
            lines.append(f"| {name} | - | not run | - | - | {OFFLINE_ONLY[name]} |")
            continue
        for row in check_config(name, args):
            failed += row["rc"] != 0
            lines.append(f"| {name} | {row['step']} | `{row['command']}` | {row['rc']} | {row['s']:.0f} | {row['note']} |")
            print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}; {failed} command(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
