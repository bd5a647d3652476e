"""A ``ditlab fit`` started beside a busy CPU: does the thread choice keep both runs progressing?

``ditlab fit`` picks its torch threads as ``--threads N``, else ``OMP_NUM_THREADS``, else the cores free now
(``cores - round(1-minute load)``, at least 1: ``ditlab/threads.py``). This bench measures what that buys on this
machine with short digits DiT fits (``configs/dit.yaml``, ``--trainer.max_steps STEPS``, no validation or grids):

1. ``alone``: run B on an idle machine (threads chosen: all cores);
2. a long fit A starts (threads chosen: all cores), and after ``--settle`` seconds (so the load average sees A):
3. ``beside, chosen``: run B beside A with the threads ditlab chooses;
4. ``beside, all cores``: run B beside A with ``--threads`` = all cores (what torch takes by default);
5. A is stopped (SIGINT, Lightning's graceful stop).

B's images/s come from its ``summary.json`` (``train_images_per_s``) with the threads it used; A's from its logged
``train/images_per_s`` in the time windows of each B run. Writes ``bench/results/busy_cpu.{json,md}``. Run it alone.

    python bench/busy_cpu.py [--steps 300] [--settle 60] [--work /tmp/busy_cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def fit_command(work: Path, name: str, steps: int, threads: int | None) -> list[str]:
    command = [sys.executable, "-m", "ditlab.cli", "fit", "--config", "configs/dit.yaml",
               "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps + 1),
               "--trainer.callbacks", "[]", "--trainer.default_root_dir", str(work / name),
               "--trainer.logger.init_args.save_dir", str(work / name / "runs"),
               "--trainer.logger.init_args.name", name]  # fmt: skip
    return command + (["--threads", str(threads)] if threads else [])


def environment() -> dict:
    """The caller's environment without ``OMP_NUM_THREADS``, so ditlab's own choice is what is measured."""
    return {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}


def run_b(work: Path, name: str, steps: int, threads: int | None) -> dict:
    """One short fit to its end: its summary's speed and threads, and its wall-clock window."""
    started, load = time.time(), load_average()
    with open(work / f"{name}.log", "w") as log:
        subprocess.run(fit_command(work, name, steps, threads), cwd=ROOT, env=environment(), stdout=log,
                       stderr=subprocess.STDOUT, check=True)  # fmt: skip
    ended = time.time()
    summary = json.loads(next((work / name / "runs" / name).glob("version_*/summary.json")).read_text())
    print(f"[busy_cpu] {name}: {summary['train_images_per_s']:.1f} images/s with "
          f"{summary['machine']['torch_threads']} threads", flush=True)  # fmt: skip
    return {"name": name, "threads": summary["machine"]["torch_threads"], "requested_threads": threads,
            "train_images_per_s": summary["train_images_per_s"], "load_average_at_start": load,
            "wall_s": ended - started, "window": [started, ended]}  # fmt: skip


def rates_in(events: list[tuple[float, float]], window: list[float]) -> float | None:
    """Median of A's logged images/s whose wall time falls in ``window``."""
    inside = [value for wall, value in events if window[0] <= wall <= window[1]]
    return statistics.median(inside) if inside else None


def a_events(work: Path) -> list[tuple[float, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = next((work / "A" / "runs" / "A").glob("version_*"))
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return [(event.wall_time, event.value) for event in events.Scalars("train/images_per_s")]


def markdown(report: dict) -> str:
    lines = ["# A ditlab fit beside a busy CPU (configs/dit.yaml, digits DiT, "
             f"{report['steps']} steps per short run)", "",
             f"{report['cores']} cores. Run A: a long fit with {report['a_threads']} threads (chosen at load "
             f"{report['a_load_at_start']}). B's images/s: its summary.json; A's: median of its logged images/s "
             "while B ran.", "",
             "| arm | B threads | B images/s | A images/s meanwhile | load at B's start |", "|---|---|---|---|---|"]
    for row in report["rows"]:
        beside = "-" if row.get("a_images_per_s") is None else f"{row['a_images_per_s']:.1f}"
        lines.append(f"| {row['arm']} | {row['threads']} | {row['train_images_per_s']:.1f} | {beside} | "
                     f"{row['load_average_at_start'][0]} |")  # fmt: skip
    if report.get("a_alone_images_per_s") is not None:
        lines += ["", f"A alone (before B started beside it): {report['a_alone_images_per_s']:.1f} images/s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps of each short run B")
    parser.add_argument("--settle", type=float, default=60, help="seconds A runs before B starts beside it")
    parser.add_argument("--work", default="/tmp/busy_cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from ditlab.threads import usable_cores

    cores = usable_cores()
    waited = time.time()
    while os.getloadavg()[0] >= 0.5 and time.time() - waited < 600:  # "alone" must find the cores free
        time.sleep(10)
    rows = [{"arm": "alone", **run_b(work, "B_alone", args.steps, None)}]
    a_load = load_average()
    a_started = time.time()
    a_log = open(work / "A.log", "w")
    a = subprocess.Popen(fit_command(work, "A", 100_000, None), cwd=ROOT, env=environment(), stdout=a_log,
                         stderr=subprocess.STDOUT)  # fmt: skip
    try:
        time.sleep(args.settle)
        rows.append({"arm": "beside A, threads chosen", **run_b(work, "B_chosen", args.steps, None)})
        rows.append({"arm": "beside A, all cores", **run_b(work, "B_all", args.steps, cores)})
    finally:
        a.send_signal(signal.SIGINT)
        try:
            a.wait(timeout=120)
        except subprocess.TimeoutExpired:
            a.kill()
            a.wait()
        a_log.close()
    events = a_events(work)
    for row in rows[1:]:
        row["a_images_per_s"] = rates_in(events, row["window"])
    a_alone = rates_in(events, [a_started, rows[1]["window"][0]])
    a_summaries = list((work / "A" / "runs" / "A").glob("version_*/summary.json"))
    a_threads = json.loads(a_summaries[0].read_text())["machine"]["torch_threads"] if a_summaries else None
    report = {"steps": args.steps, "cores": cores, "settle_s": args.settle, "a_load_at_start": a_load,
              "a_threads": a_threads if a_threads is not None else "chosen", "a_alone_images_per_s": a_alone,
              "rows": rows, "load_average_at_end": load_average()}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "busy_cpu.json").write_text(json.dumps(report, indent=1))
    (out / "busy_cpu.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
