"""The teacher a compression run starts from: a file if there is one, else a recipe trained once and cached.

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
from dataclasses import dataclass, field, fields
from pathlib import Path

from ditlab.checkpoint import network_from_checkpoint, read_checkpoint
from ditlab.methods.config import ObjectiveConfig, SamplingConfig
from ditlab.models.dit import DiT


def cache_root() -> Path:
    """``$DITLAB_CACHE`` or ``~/.cache/ditlab``: where built teachers and metric networks live."""
    return Path(os.environ.get("DITLAB_CACHE", Path.home() / ".cache" / "ditlab")).expanduser()


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


def build_from_recipe(config: TeacherConfig) -> Path:
    """Path of the cached teacher checkpoint for ``config.recipe``, training it first if it is not cached."""
    recipe = Path(config.recipe)
    if not recipe.is_file():
        raise FileNotFoundError(
            f"teacher recipe {recipe} does not exist; set model.teacher.recipe to a config such as "
            "configs/dit.yaml, or model.teacher.checkpoint to a trained teacher"
        )
    folder = Path(config.cache_dir or cache_root() / "teachers") / f"{recipe.stem}-{recipe_key(recipe, config.recipe_args)}"
    target = folder / "teacher.ckpt"
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


def load_teacher(config: TeacherConfig, objective: ObjectiveConfig, sampling: SamplingConfig) -> Teacher:
    """The frozen teacher; ``objective``/``sampling`` fill in for files that do not record them."""
    path = Path(config.checkpoint) if config.checkpoint else build_from_recipe(config)
    if not path.exists():
        raise FileNotFoundError(
            f"teacher {path} does not exist; pass a ditlab .ckpt, a public DiT .pt, a .safetensors export or a "
            "diffusers folder as model.teacher.checkpoint, or leave it null to train configs/dit.yaml once"
        )
    if path.suffix == ".ckpt":
        checkpoint = read_checkpoint(path)
        network = network_from_checkpoint(checkpoint)
        meta = checkpoint["ditlab"]
        objective = ObjectiveConfig(**known_fields(ObjectiveConfig, meta["objective"]))
        sampling = SamplingConfig(**known_fields(SamplingConfig, meta["sampling"]))
    else:
        from ditlab.models import interop

        if path.is_dir():
            from diffusers import DiTTransformer2DModel

            network = interop.from_diffusers(DiTTransformer2DModel.from_pretrained(path, local_files_only=True))
        elif path.suffix == ".safetensors":
            network = interop.load_safetensors(path)
        else:
            network = interop.load_dit_checkpoint(path)
    return Teacher(network.requires_grad_(False).eval(), objective, sampling, str(path))


def known_fields(cls, values: dict) -> dict:
    """The entries of ``values`` that are fields of dataclass ``cls`` (older checkpoints may carry others)."""
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in values.items() if key in names}
