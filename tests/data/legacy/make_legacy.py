"""Write the legacy checkpoints and their reference samples with an OLD ditlab checkout (see README.md here).

    git worktree add --detach /tmp/ditlab-4f96e90 4f96e90
    cd /tmp/ditlab-4f96e90 && PYTHONPATH=/tmp/ditlab-4f96e90 OMP_NUM_THREADS=1 \
        python /work/main/tests/data/legacy/make_legacy.py --out /work/main/tests/data/legacy

Every run is a shipped config shrunk to seconds (2 blocks of width 16, a few steps) and trained by ``python -m
ditlab fit`` of the checkout on ``PYTHONPATH``; its reference samples come from that checkout's ``ditlab sample``
(uint8 ``samples.npz``) and its network's raw output on fixed inputs (float32, ``*.forward.npz``), so
``tests/test_legacy_checkpoints.py`` can hold today's code to them bitwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

NETWORK = {"depth": 2, "hidden_size": 16, "num_heads": 2}
STEPS = 5  # sampling steps of every reference sample
NUM = 4  # images per reference sample
TRAIN = 100  # training steps of the DiT and SiT runs: enough for outputs far from zero


def run_ditlab(repo: Path, work: Path, *args: str) -> None:
    """``python -m ditlab ARGS`` of the old checkout, in ``work``; a failure stops everything with its output."""
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "ditlab", *args], cwd=work, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"ditlab {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def shrunk(repo: Path, name: str, edit) -> dict:
    """``configs/<name>.yaml`` with a tiny network, batch 8, no sample grids or sanity validation, then ``edit``."""
    config = yaml.safe_load((repo / "configs" / f"{name}.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1)
    trainer["callbacks"] = [c for c in trainer.get("callbacks", []) if not c["class_path"].endswith("SampleGrid")]
    model = config["model"]["init_args"]
    model["warmup_steps"] = 0
    if "network" in model:  # a run that trains a network (not a router over a teacher)
        model["network"].update(NETWORK)
        model["ema_decay"] = 0.9  # so that 100 steps move the EMA weights off adaLN-Zero's zeros
    config["data"]["init_args"]["batch_size"] = 8
    edit(config)
    return config


def fit(repo: Path, work: Path, name: str, config: dict, steps: int, checkpoint: str = "final.ckpt") -> Path:
    """Train ``config`` for ``steps`` and return its checkpoint ``checkpoint`` (a file name under checkpoints/)."""
    run = work / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    run_ditlab(repo, run, "fit", "--config", "config.yaml", "--trainer.max_steps", str(steps),
           "--trainer.default_root_dir", str(run))  # fmt: skip
    return next(run.rglob(f"checkpoints/{checkpoint}"))


def sample(repo: Path, work: Path, ckpt: Path, out: Path, *args: str, steps: int = STEPS) -> None:
    """``ditlab sample --ckpt CKPT --num 4 --steps 5 ARGS`` -> ``out`` (its samples.npz)."""
    folder = Path(tempfile.mkdtemp(dir=work))
    run_ditlab(repo, work, "sample", "--ckpt", str(ckpt), "--num", str(NUM), "--out", str(folder), "--steps", str(steps),
           *args)  # fmt: skip
    shutil.copy(folder / "samples.npz", out)


def forward(network, out: Path) -> None:
    """The network's raw output on fixed inputs (saved with them): the weights, exactly."""
    import torch

    generator = torch.Generator().manual_seed(0)
    config = network.config
    x = torch.randn(3, config.in_channels, config.input_size, config.input_size, generator=generator)
    t, y = torch.tensor([10.0, 500.0, 990.0]), torch.tensor([1, 5, 9])
    with torch.no_grad():
        output = network(x, t, y)
    np.savez(out, x=x.numpy(), t=t.numpy(), y=y.numpy(), out=output.numpy())


def mixture_samples(ckpt: Path, out: Path, out_forward: Path) -> None:
    """What ``ditlab sample --ckpt CKPT --num 4 --steps 5`` draws, for a Mixture-of-Blocks checkpoint that the old
    ``ditlab sample`` refuses (its network loads only through ``load_mixture_of_blocks``)."""
    from dataclasses import replace

    import torch

    from ditlab.analysis import sample_bundle, sampling_model
    from ditlab.checkpoint import Bundle, read_checkpoint, run_settings
    from ditlab.methods.moe.blocks import load_mixture_of_blocks
    from ditlab.tools.sample import to_uint8

    meta = read_checkpoint(ckpt)["ditlab"]
    network = load_mixture_of_blocks(ckpt)
    objective, sampling = run_settings(meta)
    sampling = replace(sampling, steps=STEPS)
    bundle = Bundle(network, objective.build(network.learn_sigma), sampling, meta.get("vae"), meta.get("latent_scale"))
    labels = torch.arange(NUM) % network.num_classes
    images = to_uint8(sample_bundle(bundle, labels, sampling, 0, model=sampling_model(bundle, sampling)))
    np.savez(out, arr_0=images, labels=labels.numpy())
    forward(network, out_forward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the checkpoints and references go")
    args = parser.parse_args()
    import ditlab  # the old checkout, through PYTHONPATH

    repo = Path(ditlab.__file__).resolve().parents[1]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="legacy-"))
    import ditlab.methods  # noqa: F401 - the old checkouts register the method kinds (the moe MLP) on import
    from ditlab.models.loading import load_network

    def keep(ckpt: Path, name: str) -> Path:
        shutil.copy(ckpt, out / f"{name}.ckpt")
        return out / f"{name}.ckpt"

    # a plain DiT: the teacher of (c) and (d), and itself a legacy checkpoint
    dit = keep(fit(repo, work, "dit", shrunk(repo, "dit", lambda c: None), steps=TRAIN), "dit")
    sample(repo, work, dit, out / "dit.samples.npz")
    forward(load_network(dit), out / "dit.forward.npz")

    # (a) a DiT whose sampling config records a feature cache in the flat knob form (cache.policy, cache.interval)
    def fora(config: dict) -> None:
        config["model"]["init_args"]["sampling"]["cache"] = {"policy": "fora", "interval": 2}

    dit_fora = keep(fit(repo, work, "dit_fora", shrunk(repo, "dit", fora), steps=TRAIN), "dit_fora")
    sample(repo, work, dit_fora, out / "dit_fora.samples.npz")  # the recorded cache
    sample(repo, work, dit_fora, out / "dit_fora.fora2.samples.npz", "--cache", "fora", "--cache.interval", "2")
    sample(repo, work, dit_fora, out / "dit_fora.nocache.samples.npz", "--cache", "none")
    forward(load_network(dit_fora), out / "dit_fora.forward.npz")

    # (b) SiT
    sit = keep(fit(repo, work, "sit", shrunk(repo, "sit", lambda c: None), steps=TRAIN), "sit")
    sample(repo, work, sit, out / "sit.samples.npz")
    forward(load_network(sit), out / "sit.forward.npz")

    # (c) Dense2MoE on the tiny DiT: carved MoE at step 0..2, Mixture of Blocks (1 of every 2 blocks) from step 2
    def dense2moe(config: dict) -> None:
        for callback in config["trainer"]["callbacks"]:
            name, init = callback["class_path"].rsplit(".", 1)[-1], callback["init_args"]
            init.update({"ProgressiveDistillation": {"at_steps": [2], "blocks": [1]}, "ExpertLoad": {"every_n_steps": 1},
                         "CompressionReport": {"num_samples": 0, "throughput_batch": 4, "steps": 2}}[name])  # fmt: skip
        model = config["model"]["init_args"]
        model["teacher"]["checkpoint"] = str(dit)
        model["carve"].update(num_experts=4, shared_width=16, calibration_images=32)  # experts of 12 units
        model["mixture"]["group_size"] = 2

    mob = fit(repo, work, "dense2moe", shrunk(repo, "dense2moe", dense2moe), steps=4)
    carved = keep(next(mob.parent.glob("stage_0_*.ckpt")), "dense2moe_carved")
    sample(repo, work, carved, out / "dense2moe_carved.samples.npz")
    forward(load_network(carved), out / "dense2moe_carved.forward.npz")
    mixture_samples(keep(mob, "dense2moe_mob"), out / "dense2moe_mob.samples.npz", out / "dense2moe_mob.forward.npz")

    # (d) a Learning-to-Cache router for 4-step DDIM on the tiny DiT, exported as a plan and sampled through it
    def l2c(config: dict) -> None:
        model = config["model"]["init_args"]
        model["teacher"]["checkpoint"] = str(dit)
        model["sampling"]["steps"] = 4
        model["log_router_every"] = 2
        config["data"]["init_args"]["batch_size"] = 4

    router = keep(fit(repo, work, "l2c", shrunk(repo, "l2c", l2c), steps=3), "l2c")
    import torch

    from ditlab.models.loading import read_checkpoint

    scores = torch.sigmoid(read_checkpoint(router)["state_dict"]["router.theta"][1::2])  # the routed (odd) calls
    threshold = str(float(scores.median()))  # about half of the routed units computed
    run_ditlab(repo, work, "export", "--ckpt", str(router), "--out", str(out / "l2c.plan.json"), "--threshold", threshold)
    sample(repo, work, dit, out / "l2c.samples.npz", "--sampler", "ddim", "--cache", f"plan:{out / 'l2c.plan.json'}",
           steps=4)  # fmt: skip
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
