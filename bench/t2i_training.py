"""Text-to-image training curves: CLIP score, compositional accuracy and scene FID against step, for the runs of
``configs/pixart.yaml`` and ``configs/mmdit.yaml`` (their ``Evaluation`` callback logs ``eval/*`` every 500 steps).

    python bench/t2i_training.py [NAME=]RUN_DIR [[NAME=]RUN_DIR ...] --out bench/results/t2i_training

reads each run's TensorBoard events and summary.json and writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (one
panel per metric, one line per run). It trains nothing: the runs themselves are the evidence, started alone on an
otherwise idle machine (their commands, wall times and load averages go in bench/README.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ditlab.analysis import scalar_series

METRICS = {"eval/clip_score": "CLIP score (scene CLIP, x100)", "eval/compositional_accuracy": "compositional accuracy",
           "eval/compositional_digit": "digit check (recognizer)", "eval/fid": "FID (scene CLIP features)"}  # fmt: skip


def run_curves(text: str) -> dict:
    """``NAME=RUN_DIR`` (or a bare run folder, named by its logger name): curves, wall time, threads and load."""
    name, sep, path = text.partition("=")
    run = Path(path if sep else text)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    return {"run": str(run), "name": name if sep else run.parent.name, "wall_time_s": summary.get("wall_time_s"),
            "steps": summary.get("steps"), "train_images_per_s": summary.get("train_images_per_s"),
            "machine": summary.get("machine"), "curves": {tag: scalar_series(run, tag) for tag in METRICS}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (…/<name>/version_N), or NAME=RUN_FOLDER")
    parser.add_argument("--out", type=Path, default=Path("bench/results/t2i_training"))
    args = parser.parse_args(argv)
    results = [run_curves(run) for run in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = ["| run | steps | wall time | threads, load at start | " + " | ".join(METRICS.values()) + " |",
             "|---" * (4 + len(METRICS)) + "|"]
    for result in results:
        last = [f"{series[-1][1]:.3f} (step {series[-1][0]})" if series else "-" for series in result["curves"].values()]
        wall = f"{result['wall_time_s'] / 60:.1f} min" if result["wall_time_s"] else "-"
        machine = result["machine"] or {}
        where = f"{machine.get('torch_threads', '-')}, {(machine.get('load_average') or ['-'])[0]}"
        lines.append(f"| {result['name']} | {result['steps']} | {wall} | {where} | " + " | ".join(last) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.6))
    for axis, (tag, label) in zip(axes, METRICS.items()):
        for result in results:
            series = result["curves"][tag]
            if series:
                axis.plot([s for s, _ in series], [v for _, v in series], marker="o", label=result["name"])
        axis.set(title=label, xlabel="training step")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(args.out.with_suffix(".png"), dpi=110)
    print("\n".join(lines))
    print(f"wrote {args.out}.json, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
