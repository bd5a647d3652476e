"""The frozen teacher a method starts from (dicomp's student, Self-Transcendence's phase 2): a file if there is
one, else a recipe trained once and cached.

A teacher is given as a ditlab Lightning checkpoint (``.ckpt``), a public facebookresearch/DiT checkpoint
(``.pt``), a ``ditlab convert`` safetensors export, or a diffusers model folder. With none of those, the
recipe config (``configs/dit.yaml`` by default) is trained once in a child ``ditlab fit`` and its final
checkpoint cached under ``$DITLAB_CACHE/teachers/<hash>/teacher.ckpt``, keyed by a hash of the recipe's
text and overrides, so the main job runs on a fresh clone with no network and the second run reuses it.
Concurrent processes (DDP ranks) serialise on a file lock: one trains, the others wait and reuse.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ditlab.checkpoint import read_checkpoint, run_settings
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.metrics.features import cache_root
from ditlab.models.dit import DiT
from ditlab.models.loading import load_network


@dataclass
class TeacherConfig:
    """Where the teacher comes from.

    Args:
        checkpoint: a ditlab ``.ckpt``, a public DiT ``.pt``, a ``.safetensors`` export or a diffusers
            folder; None trains ``recipe`` once and caches it.
        recipe: the config that trains the teacher when there is no checkpoint.
        recipe_args: extra ``ditlab fit`` arguments for the recipe (part of the cache key).
        cache_dir: where built teachers are kept; None means ``$DITLAB_CACHE/teachers``.
    """

    checkpoint: str | None = None
    recipe: str = "configs/dit.yaml"
    recipe_args: list[str] = field(default_factory=list)
    cache_dir: str | None = None


def recipe_key(recipe: Path, args: list[str]) -> str:
    """A short hash of the recipe text and its overrides: same recipe, same teacher."""
    digest = hashlib.sha256(recipe.read_bytes())
    digest.update("\0".join(args).encode())
    return digest.hexdigest()[:16]


def recipe_target(config: TeacherConfig) -> Path:
    """Where the recipe's teacher is cached: ``<cache>/teachers/<recipe>-<hash>/teacher.ckpt``."""
    recipe = Path(config.recipe)
    if not recipe.is_file():
        raise FileNotFoundError(
            f"teacher recipe {recipe} does not exist; set model.teacher.recipe to a config such as "
            "configs/dit.yaml, or model.teacher.checkpoint to a trained teacher"
        )
    folder = Path(config.cache_dir or cache_root() / "teachers") / f"{recipe.stem}-{recipe_key(recipe, config.recipe_args)}"
    return folder / "teacher.ckpt"


def build_from_recipe(config: TeacherConfig) -> Path:
    """Path of the cached teacher checkpoint for ``config.recipe``, training it first if it is not cached."""
    recipe, target = Path(config.recipe), recipe_target(config)
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be training it: wait, then reuse
        if target.is_file():
            print(f"teacher: reusing {target}", flush=True)
            return target
        work = folder / "run"
        shutil.rmtree(work, ignore_errors=True)
        command = [sys.executable, "-m", "ditlab", "fit", "--config", str(recipe),
                   "--trainer.logger.init_args.save_dir", str(work), "--trainer.logger.init_args.name", "teacher",
                   *config.recipe_args]  # fmt: skip
        print(f"teacher: no cached teacher for {recipe}; training it once (cached as {target})", flush=True)
        result = subprocess.run(command, check=False)
        finals = sorted(work.glob("teacher/version_*/checkpoints/final.ckpt"))
        if result.returncode != 0 or not finals:
            raise RuntimeError(
                f"training the teacher recipe {recipe} failed (exit code {result.returncode}); run "
                f"`ditlab fit --config {recipe}` to see why, or set model.teacher.checkpoint"
            )
        partial = target.with_suffix(".partial")
        shutil.copyfile(finals[-1], partial)
        summary = finals[-1].parents[1] / "summary.json"
        if summary.is_file():
            shutil.copyfile(summary, folder / "summary.json")
        os.replace(partial, target)  # atomic: a half-copied teacher is never found at the final path
        print(f"teacher: cached {target} (its run, with TensorBoard logs and sample grids: {work})", flush=True)
        return target


@dataclass
class Teacher:
    """A frozen teacher network with the objective and sampling settings it was trained and sampled with."""

    network: DiT
    objective: ObjectiveConfig
    sampling: SamplingConfig
    source: str


def teacher_path(config: TeacherConfig) -> Path:
    """The teacher file: ``config.checkpoint``, or the recipe's cached build. Never trains: a recipe that is not
    built yet is an error (``build_from_recipe``, which modules call from ``prepare_data``, builds it)."""
    if config.checkpoint:
        path = Path(config.checkpoint).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"teacher {path} does not exist; pass a ditlab .ckpt, a public DiT .pt, a .safetensors export or a "
                "diffusers folder as model.teacher.checkpoint, or leave it null to train configs/dit.yaml once"
            )
        return path
    path = recipe_target(config)
    if not path.is_file():
        raise FileNotFoundError(f"the teacher recipe {config.recipe} is not built yet ({path}); `ditlab fit` builds it "
                                "before training (prepare_data), or call build_from_recipe(config) first")  # fmt: skip
    return path


def load_teacher(config: TeacherConfig, objective: ObjectiveConfig, sampling: SamplingConfig) -> Teacher:
    """The frozen teacher; ``objective``/``sampling`` fill in for files that do not record them."""
    path = teacher_path(config)
    source: str | Path | dict = path
    if path.suffix == ".ckpt" or (path / ".metadata").is_file():
        source = read_checkpoint(path)
        objective, sampling = run_settings(source["ditlab"])
    network = load_network(source)
    return Teacher(network.requires_grad_(False).eval(), objective, sampling, str(path))
