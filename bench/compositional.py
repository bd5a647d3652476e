"""Is the scene recognizer good enough to judge prompts? Compositional accuracy (GenEval-style) of real
validation scenes against their own captions (should be near 1) and against shuffled captions (near chance),
the recognizer's build time, and 2 gloo processes vs 1 process (must be equal).

Writes ``bench/results/compositional.json``. The recognizer is built (or loaded) from ``$DITLAB_CACHE``.

    python bench/compositional.py [--num 2000] [--retrain] [--no-ddp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ditlab.data.scenes import SCENES_NAME, DigitScenes
from ditlab.metrics.compositional import CompositionalAccuracy
from ditlab.metrics.scene_recognizer import scene_recognizer

RESULTS = Path(__file__).resolve().parent / "results"


def loadavg() -> list[float]:
    """The 1, 5 and 15-minute load averages (evidence runs alone: below 1.5 at the start)."""
    return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]


def shard_worker(rank: int, world: int, store: str, num: int, out: str) -> None:
    """One of ``world`` gloo processes: scores its interleaved shard, then the synced compute."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    scenes = DigitScenes("validation", 32, num)
    mine = list(range(rank, num, world))
    metric = CompositionalAccuracy(scene_recognizer())
    metric.update(scenes.images(mine), scenes.attributes(mine))
    result = metric.compute()
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=2000, help="validation scenes scored")
    parser.add_argument("--retrain", action="store_true", help="rebuild the recognizer to time its build")
    parser.add_argument("--no-ddp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = loadavg()
    started = time.perf_counter()
    recognizer = scene_recognizer(retrain=args.retrain)
    load_after_build = loadavg()
    scenes = DigitScenes("validation", 32, args.num)
    images, attributes = scenes.images(range(args.num)), scenes.attributes(range(args.num))
    real = CompositionalAccuracy(recognizer)
    real.update(images, attributes)
    permutation = torch.randperm(args.num, generator=torch.Generator().manual_seed(0))
    shuffled = CompositionalAccuracy(recognizer)
    shuffled.update(images, [attributes[i] for i in permutation.tolist()])  # another scene's caption
    large = DigitScenes("validation", 64, args.num // 4)
    at_64 = CompositionalAccuracy(recognizer)
    at_64.update(large.images(range(args.num // 4)), large.attributes(range(args.num // 4)))
    report = {
        "dataset": SCENES_NAME, "recipe": asdict(recognizer.recipe),
        "fingerprint": recognizer.fingerprint, "build_seconds": recognizer.train_seconds,
        "build_accuracy_on_recipe_eval": recognizer.accuracy, "num_validation_scenes": args.num,
        "real_captions": real.compute(), "shuffled_captions": shuffled.compute(),
        "real_captions_64px": at_64.compute(), "seconds_this_run": time.perf_counter() - started,
        "loadavg_start": load_before, "loadavg_after_build": load_after_build, "loadavg_end": loadavg(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
    }  # fmt: skip
    if not args.no_ddp:
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "ddp.json")
            mp.spawn(shard_worker, args=(2, os.path.join(folder, "store"), args.num, out), nprocs=2)
            report["ddp_2_processes"] = json.loads(Path(out).read_text())
        report["ddp_equals_1_process"] = report["ddp_2_processes"] == report["real_captions"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compositional.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
