"""The frozen teacher a method starts from (dicomp's student, Self-Transcendence's phase 2): a file if there is
one, else a recipe trained once and cached.

A teacher is given as a ditlab Lightning checkpoint (``.ckpt``), a public facebookresearch/DiT checkpoint
(``.pt``), a ``ditlab convert`` safetensors export, or a diffusers model folder. With none of those, the
recipe config (``configs/dit.yaml`` by default) is trained once in a child ``ditlab fit`` and its final
checkpoint cached under ``$DITLAB_CACHE/teachers/<recipe>-<hash>/teacher.ckpt``, keyed by a hash of the recipe's
text and overrides, so the main job runs on a fresh clone with no network and the second run reuses it.

The build is safe to stop at any moment:

- the child never outlives the main job (``ditlab.child_process``): Ctrl-C or SIGTERM to the main job is
  forwarded to it, it saves ``interrupted.ckpt`` and exits, then the main job exits 130 / 143; if the main job
  is killed outright, the kernel sends the child SIGTERM (Linux);
- the partial run stays in ``<cache entry>/run`` until the teacher is complete, and the next build resumes
  from its newest checkpoint instead of step 0;
- ``<cache entry>/.lock`` is held for the whole build, by the main job and by its child (so a child still saving
  after its parent died keeps others out): a second process (another job, another DDP node) waits, then reuses.
"""

from __future__ import annotations

import fcntl
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.utilities.exceptions import SIGTERMException

from ditlab.atomic import DiskFull, copy_file
from ditlab.checkpoint import read_checkpoint, run_settings
from ditlab.child_process import run_child
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.frozen import FrozenNetwork
from ditlab.metrics.features import cache_root
from ditlab.models.dit import DiT
from ditlab.models.loading import ditlab_entry, load_network


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
    """Path of the cached teacher checkpoint for ``config.recipe``, training it first (or resuming its interrupted
    build) if it is not cached; waits for another process already building it."""
    target = recipe_target(config)
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process (or the child of one that was killed) is training it
            print(f"teacher: another process is building {target}; waiting for it", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            print(f"teacher: reusing {target}", flush=True)
            return target
        work = folder / "run"
        final = newest_checkpoint(work, "final.ckpt")  # trained, but not cached yet when its build was stopped
        if final is None:
            final = train_recipe(config, work, target, lock.fileno())
        try:  # atomic: a half-copied teacher is never found at the final path
            summary = final.parents[1] / "summary.json"
            if summary.is_file():
                copy_file(summary, folder / "summary.json")
            copy_file(final, target)
        except DiskFull as full:
            full.saved.append(f"the trained teacher {final}")
            full.hint = "free some space and rerun: the teacher is copied into the cache, not trained again"
            raise
        print(f"teacher: cached {target} (its run, with TensorBoard logs and sample grids: {work})", flush=True)
        return target


def newest_checkpoint(work: Path, name: str = "*.ckpt") -> Path | None:
    """The most recently written checkpoint ``name`` of the recipe's runs in ``work`` (a resumed build adds a
    version), or None. Checkpoints are written atomically, so whatever is found is complete."""
    found = list(work.glob(f"teacher/version_*/checkpoints/{name}"))
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def train_recipe(config: TeacherConfig, work: Path, target: Path, lock: int) -> Path:
    """Train ``config.recipe`` in a child ``ditlab fit`` logging to ``work`` (resuming its newest checkpoint there)
    and return its ``final.ckpt``. The child holds the ``lock`` descriptor too."""
    recipe, resume = Path(config.recipe), newest_checkpoint(work)
    command = [sys.executable, "-m", "ditlab", "fit", "--config", str(recipe),
               "--trainer.logger.init_args.save_dir", str(work), "--trainer.logger.init_args.name", "teacher",
               *config.recipe_args, *(["--ckpt_path", str(resume)] if resume else [])]  # fmt: skip
    if resume:
        print(f"teacher: resuming the interrupted build of {recipe} from {resume} (cached as {target})", flush=True)
    else:
        print(f"teacher: no cached teacher for {recipe}; training it once (cached as {target})", flush=True)
    try:
        code = run_child(command, pass_fds=(lock,))
    except (KeyboardInterrupt, SIGTERMException) as stop:
        saved = newest_checkpoint(work)
        how = "Ctrl-C" if isinstance(stop, KeyboardInterrupt) else "SIGTERM"
        after = f"saved {saved}; the next run resumes from it" if saved else "nothing saved yet; the next run starts over"
        print(f"teacher: the build of {recipe} was stopped ({how}); {after}", flush=True)
        raise
    final = newest_checkpoint(work, "final.ckpt")
    if code == 2:  # a user error (a full disk, a bad override), which the child has printed in one line
        raise ValueError(f"the teacher build of {recipe} stopped on the error above; fix it and rerun (its partial "
                         f"run is kept in {work} and resumed)")  # fmt: skip
    if code != 0 or final is None:
        raise RuntimeError(
            f"training the teacher recipe {recipe} failed (exit code {code}); run `ditlab fit --config {recipe}` to "
            f"see why, or set model.teacher.checkpoint (its partial run is kept in {work}; delete it to start over)"
        )
    return final


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


class FromTeacher:
    """Mixin for a method module that starts from a frozen teacher (dicomp, grafting, learned caching, feedback,
    dynamic compute): the recipe is built in ``prepare_data`` (once per node, cached), the teacher is read lazily
    on first use and held out of the state dict, optimiser and DDP (``FrozenNetwork``), and the run adopts the
    teacher's objective and, unless the config gives its own, its sampling settings.

    The module sets ``self.teacher_config`` and calls :meth:`hold_teacher` in its ``__init__``; it may override
    :meth:`check_teacher` to refuse a teacher it cannot start from.
    """

    teacher_config: TeacherConfig

    def hold_teacher(self, sampling_given: bool) -> None:

        self._sampling_given = sampling_given
        self._teacher = FrozenNetwork(self._load_teacher)

    def prepare_data(self) -> None:
        """Train the teacher recipe once (cached) when no teacher file is given; runs on one process per node."""
        if not self.teacher_config.checkpoint:
            build_from_recipe(self.teacher_config)

    @property
    def teacher(self) -> DiT:
        """The frozen teacher on this module's device (read from its file on first use; never trained here)."""
        return self._teacher.get(self.device)

    def sampled_entry(self) -> dict:
        """The checkpoint's ``ditlab`` entry of a run that samples through its teacher (a router, a feedback block):
        the teacher's architecture, the run's objective and sampling settings, the module that rebuilds the sampler
        (``sampled_by``) and the teacher file, so ``ditlab sample --ckpt RUN.ckpt`` needs nothing else."""
        entry = ditlab_entry(self.teacher.config, self.objective_config, self.sampling, self.vae_path, self.latent_scale)
        return {**entry, "sampled_by": f"{type(self).__module__}.{type(self).__qualname__}",
                "teacher": str(teacher_path(self.teacher_config).resolve())}

    def check_teacher(self, loaded: Teacher) -> None:
        """Refuse a teacher this method cannot start from (one-line ``ValueError``); any teacher by default."""

    def _load_teacher(self) -> DiT:
        loaded = load_teacher(self.teacher_config, self.objective_config, self.sampling)
        self.check_teacher(loaded)
        self.objective_config = loaded.objective
        if not self._sampling_given:
            self.sampling = loaded.sampling
        return loaded.network
