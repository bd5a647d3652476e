"""Screenshots of TensorBoard on a short digits run: what `tensorboard --logdir runs` shows a ditlab user.

Trains ``configs/dit.yaml`` for a few hundred steps with sample grids and in-loop FID (unless ``--logdir``
already holds a run), serves TensorBoard on it, and renders the scalars and images views with headless
chromium (``apt-get install -y chromium``) into ``bench/results/tensorboard.png`` (scalars),
``tensorboard_images.png`` (sample grids) and ``tensorboard_hparams.png`` (resolved config). Run by hand::

    OMP_NUM_THREADS=1 nice -n 19 python bench/tensorboard_screenshot.py --steps 300
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# the legacy dashboards draw with SVG, so they render in headless chromium (#timeseries needs WebGL)
SCALARS = "^train/|^val/|^lr-|^eval/fid|^dicomp/|^compression/"
VIEWS = {
    "tensorboard.png": (
        f"#scalars&tagFilter={urllib.parse.quote(SCALARS, safe='')}&_smoothingWeight=0",
        "1400,1500",
    ),
    "tensorboard_images.png": ("#images", "1400,1000"),
    "tensorboard_hparams.png": ("#hparams", "1400,1000"),
}


def train(logdir: Path, steps: int, every: int) -> None:
    """A short digits run with sample grids and FID every ``every`` steps."""
    config = yaml.safe_load((ROOT / "configs" / "dit.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("SampleGrid"):
            callback["init_args"]["every_n_steps"] = every
    config["trainer"]["callbacks"].append({
        "class_path": "ditlab.callbacks.evaluation.Evaluation",
        "init_args": {"every_n_steps": every, "num_samples": 200},
    })  # fmt: skip
    path = logdir / "config.yaml"
    logdir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "ditlab", "fit", "--config", str(path), "--trainer.max_steps", str(steps),
                    "--trainer.val_check_interval", str(every),
                    "--trainer.logger.init_args.save_dir", str(logdir)], check=True)  # fmt: skip


def serve(logdir: Path, port: int) -> subprocess.Popen:
    """TensorBoard on ``logdir``, returned once it answers."""
    server = subprocess.Popen(["tensorboard", "--logdir", str(logdir), "--port", str(port), "--host", "localhost"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(60):
        try:
            urllib.request.urlopen(f"http://localhost:{port}/data/runs", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    server.terminate()
    raise RuntimeError(f"tensorboard did not answer on port {port} within 60 s")


def screenshot(url: str, out: Path, size: str = "1400,1000", budget_ms: int = 20000) -> None:
    """Headless chromium render of ``url`` (virtual time lets the JS app load its data first)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise FileNotFoundError("chromium is not installed; run `apt-get install -y chromium`")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, default=Path("/tmp/tbrun"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100, help="sample grid, validation and FID interval")
    parser.add_argument("--port", type=int, default=6006)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if not any(args.logdir.glob("**/events.out.tfevents.*")):
        train(args.logdir, args.steps, args.every)
    server = serve(args.logdir, args.port)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, (view, size) in VIEWS.items():
            screenshot(f"http://localhost:{args.port}/{view}", args.out / name, size=size)
            print(f"wrote {args.out / name}")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
