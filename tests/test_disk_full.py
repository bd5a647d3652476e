"""Issue 37: running out of space while writing any artefact is one line (file, space needed, what is saved), exit
code 2 from ``ditlab``, and no partial or temporary file; a run stopped by it keeps its summary and resumes exactly.

The small volume is simulated: :class:`SmallVolume` meters the files ``ditlab.atomic`` writes under a folder and
raises ``ENOSPC`` (what fits of the failing write lands, as on a real disk) once the folder would hold more than its
capacity. Writers that are not atomic (TensorBoard's events, DCP's shards) get the error injected where they write.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from ditlab import atomic
from ditlab.atomic import DiskFull, save_bytes, save_json, save_torch
from ditlab.callbacks.interrupt import newest_checkpoint
from ditlab.callbacks.samples import SampleGrid
from ditlab.callbacks.summary import RunSummary
from ditlab.checkpoint import read_checkpoint
from ditlab.cli import main
from ditlab.data import shards
from ditlab.distributed import FSDP2Strategy
from ditlab.methods.teacher import TeacherConfig, build_from_recipe, recipe_target
from ditlab.metrics.features import cached_training
from ditlab.metrics.reference import reference_stats

ROOT = Path(__file__).resolve().parents[1]


class SmallVolume:
    """Files ``ditlab.atomic`` writes under ``root`` raise ``code`` once ``root`` would hold more than ``capacity``
    bytes; ``capacity=None``: room for the first checkpoint and half of another, fixed when the first is written."""

    def __init__(self, root: Path, capacity: int | None = None, code: int = errno.ENOSPC) -> None:
        self.root, self.capacity, self.code = root, capacity, code

    def used(self, besides: Path) -> int:
        return sum(path.stat().st_size for path in self.root.rglob("*") if path.is_file() and path != besides)

    def open(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        inside = Path(path).resolve().is_relative_to(self.root.resolve())
        return Metered(handle, self, Path(path)) if "w" in mode and inside else handle


class Metered:
    def __init__(self, handle, volume: SmallVolume, path: Path) -> None:
        self._handle, self._volume, self._path, self.written = handle, volume, path, 0

    def write(self, data) -> int:
        capacity = self._volume.capacity
        room = capacity - self._volume.used(self._path) - self.written if capacity is not None else len(data)
        if len(data) > room:
            self._handle.write(bytes(data[: max(room, 0)]))
            raise OSError(self._volume.code, os.strerror(self._volume.code))
        self.written += len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()
        if self._volume.capacity is None and ".ckpt" in self._path.name and exc[0] is None:
            self._volume.capacity = self._volume.used(self._path) + self.written + self.written // 2


@pytest.fixture
def small_volume(monkeypatch, tmp_path):
    def make(root: Path = tmp_path, capacity: int | None = None, code: int = errno.ENOSPC) -> SmallVolume:
        volume = SmallVolume(root, capacity, code)
        monkeypatch.setattr(atomic, "open", volume.open, raising=False)
        return volume

    return make


def leftovers(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if ".tmp-" in path.name or ".old-" in path.name]


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------------------------------------ the helper
def test_a_full_disk_keeps_the_old_file_names_the_sizes_and_leaves_no_temporary(tmp_path, small_volume):
    path = save_torch({"step": 1, "w": torch.ones(3)}, tmp_path / "last.ckpt")
    small_volume(capacity=path.stat().st_size + 1000)
    with pytest.raises(DiskFull) as caught:
        save_torch({"step": 2, "w": torch.zeros(100_000)}, path)
    text = one_line(caught.value)
    assert text.startswith(f"no space left on device writing {path} (needs about 0.4 MiB, ")
    assert "free there); it was not written" in text
    assert torch.load(path, weights_only=True)["step"] == 1
    assert not leftovers(tmp_path)
    with pytest.raises(DiskFull, match="needs about 0.0 MiB"):
        save_bytes(b"x" * 2000, tmp_path / "new.bin")
    assert not (tmp_path / "new.bin").exists() and not leftovers(tmp_path)


def test_a_full_quota_says_so(tmp_path, small_volume):
    small_volume(capacity=10, code=errno.EDQUOT)
    with pytest.raises(DiskFull, match=r"^disk quota exceeded writing .*meta\.json \(needs about 0\.0 MiB\)"):
        save_json({"a": "b" * 100}, tmp_path / "meta.json")
    assert not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ each writer
def test_sample_grid(tmp_path, small_volume, monkeypatch):
    monkeypatch.setattr(SampleGrid, "grid", lambda self, *args: torch.rand(3, 50, 50))  # sampling is not the point
    small_volume(capacity=100)
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, global_step=7, loggers=[],
                              default_root_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(DiskFull, match=r"writing .*samples/step_0000007\.png \(needs"):
        SampleGrid(per_class=2).log_grid(trainer, SimpleNamespace(summary={}))
    assert not list(tmp_path.rglob("*.png")) and not leftovers(tmp_path)


def test_summary(tmp_path, small_volume):
    small_volume(capacity=100)
    trainer = SimpleNamespace(is_global_zero=True, loggers=[], default_root_dir=str(tmp_path), callback_metrics={},
                              global_step=3, datamodule=None)  # fmt: skip
    with pytest.raises(DiskFull, match=r"writing .*summary\.json \(needs"):
        RunSummary().write(trainer, SimpleNamespace(summary={}), memory={})
    assert not list(tmp_path.rglob("summary.json")) and not leftovers(tmp_path)


def test_latent_shard_names_the_complete_shards(tmp_path, small_volume):
    shards.save_shard(shards.shard_path(tmp_path, 0), {"labels": torch.zeros(4, dtype=torch.long)}, {})
    small_volume(capacity=2000)
    with pytest.raises(DiskFull) as caught:
        shards.save_shard(shards.shard_path(tmp_path, 1), {"labels": torch.zeros(400, dtype=torch.long)}, {})
    assert f"already saved: 1 complete shards in {tmp_path}; free some space and rerun the same `ditlab encode`" \
        in one_line(caught.value)  # fmt: skip
    assert [path.name for path in tmp_path.iterdir()] == ["shard-00000.safetensors"]


def test_teacher_cache_keeps_the_trained_teacher(tmp_path, small_volume):
    config = TeacherConfig(recipe=str(ROOT / "configs" / "dit.yaml"), cache_dir=str(tmp_path / "cache"))
    run = recipe_target(config).parent / "run" / "teacher" / "version_0"
    final = save_bytes(os.urandom(50_000), run / "checkpoints" / "final.ckpt")
    save_json({"steps": 2000}, run / "summary.json")
    small_volume(root=tmp_path / "cache", capacity=60_000)
    with pytest.raises(DiskFull) as caught:
        build_from_recipe(config)
    text = one_line(caught.value)
    assert f"writing {recipe_target(config)} (needs about 0.0 MiB" in text
    assert f"already saved: the trained teacher {final}; free some space and rerun" in text
    assert not recipe_target(config).exists() and not leftovers(tmp_path)


def test_teacher_build_that_ran_out_of_space_is_one_line_too(tmp_path, monkeypatch):
    """The child ``ditlab fit`` printed its one line and exited 2; the main job adds one line, not a traceback."""
    from ditlab.methods import teacher

    monkeypatch.setattr(teacher, "run_child", lambda command, pass_fds: 2)
    config = TeacherConfig(recipe=str(ROOT / "configs" / "dit.yaml"), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"dit\.yaml stopped on the error above; fix it and rerun \(its partial"):
        build_from_recipe(config)


class Extractor:
    """The feature-network interface reference statistics need, with 4 trivial features."""

    fingerprint = "test"

    def features_and_logits(self, images: torch.Tensor, progress=None):
        return images.flatten(1)[:, :4].double(), None


def test_reference_statistics(tmp_path, small_volume):
    small_volume(capacity=100)
    with pytest.raises(DiskFull, match=r"writing .*reference-digits-8-test\.pt \(needs"):
        reference_stats("digits", Extractor(), image_size=8, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_self_trained_network_cache(tmp_path, small_volume):
    small_volume(capacity=100)
    with pytest.raises(DiskFull, match=r"writing .*net\.pt \(needs about 0\.4 MiB"):
        cached_training(tmp_path / "net.pt", lambda: {"weights": torch.ones(100_000)})
    assert not list(tmp_path.iterdir())


def test_sharded_checkpoint_folder_is_swapped_in_whole_or_not_at_all(tmp_path, monkeypatch):
    """The DCP write itself is stubbed (one process, no process group): a shard file, then ENOSPC."""
    strategy = FSDP2Strategy()
    strategy.parallel_devices = [torch.device("cpu")]
    target = tmp_path / "last.ckpt"

    def write_shards(self, checkpoint, path, storage_options=None, fail=False):
        path.mkdir(parents=True)
        (path / "__0_0.distcp").write_bytes(b"shard of step %d" % checkpoint["step"])
        if fail:  # what DCP raises: every process's failure, as (exception, traceback)
            raise CheckpointException("write failed", {0: (OSError(errno.ENOSPC, "No space left on device"), None)})

    save = FSDP2Strategy.__mro__[1].save_checkpoint
    monkeypatch.setattr(FSDP2Strategy.__mro__[1], "save_checkpoint", write_shards)
    strategy.save_checkpoint({"step": 1}, target)
    assert (target / "__0_0.distcp").read_bytes() == b"shard of step 1"
    monkeypatch.setattr(FSDP2Strategy.__mro__[1], "save_checkpoint",
                        lambda *args, **kwargs: write_shards(*args, **kwargs, fail=True))  # fmt: skip
    with pytest.raises(DiskFull, match=rf"^no space left on device writing {target} \("):
        strategy.save_checkpoint({"step": 2}, target)
    assert (target / "__0_0.distcp").read_bytes() == b"shard of step 1"  # the old folder, untouched
    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]
    monkeypatch.setattr(FSDP2Strategy.__mro__[1], "save_checkpoint", save)


# ------------------------------------------------------------------------------------------------ ditlab fit
def test_the_checkpoint_to_resume_is_this_runs_newest_else_the_one_it_resumed_from(tmp_path):
    earlier = save_bytes(b"ckpt", tmp_path / "version_0" / "checkpoints" / "epoch=0-step=10.ckpt")
    trainer = SimpleNamespace(checkpoint_callbacks=[], loggers=[], default_root_dir=str(tmp_path / "version_1"),
                              ckpt_path=str(earlier))  # fmt: skip
    assert newest_checkpoint(trainer) == earlier
    first = save_bytes(b"ckpt", tmp_path / "version_1" / "checkpoints" / "epoch=0-step=20.ckpt")
    assert newest_checkpoint(trainer) == first
    os.utime(first, ns=(0, 0))
    second = save_bytes(b"ckpt", tmp_path / "version_1" / "checkpoints" / "last.ckpt")
    assert newest_checkpoint(trainer) == second


TINY = ["--config", str(ROOT / "configs" / "dit.yaml"), "--model.init_args.network.hidden_size", "32",
        "--model.init_args.network.depth", "2", "--model.init_args.network.num_heads", "2",
        "--model.init_args.sampling.steps", "3", "--data.init_args.batch_size", "16",
        "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0"]  # fmt: skip
PERIODIC = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "2"]


def fit(root: Path, *args: str) -> int:
    return main(["fit", *TINY, "--trainer.default_root_dir", str(root), *args])


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.slow
def test_fit_out_of_space_at_the_end_keeps_final_ckpt_and_the_summary(tmp_path, small_volume, capsys):
    """The issue's run: room for ``final.ckpt`` but not ``last.ckpt`` after it."""
    small_volume(root=tmp_path)
    assert fit(tmp_path, "--trainer.max_steps", "2") == 2
    run = tmp_path / "dit" / "version_0"
    final, summary = run / "checkpoints" / "final.ckpt", run / "summary.json"
    line = error_line(capsys)
    assert line.startswith(f"ditlab: error: no space left on device writing {run / 'checkpoints' / 'last.ckpt'} "
                           "(needs ")  # fmt: skip
    assert line.endswith(f"it was not written; already saved: {final} (the newest complete checkpoint), {summary}; "
                         f"free some space; --ckpt_path {final} resumes from it")  # fmt: skip
    assert read_checkpoint(final)["global_step"] == 2
    stopped = json.loads(summary.read_text())
    assert stopped["steps"] == 2 and stopped["checkpoint"] == str(final) and "last.ckpt" in stopped["stopped"]
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["final.ckpt"]
    assert not leftovers(tmp_path)


@pytest.mark.slow
def test_fit_out_of_space_mid_training_stops_and_resumes_exactly(tmp_path, small_volume, capsys):
    assert fit(tmp_path / "whole", "--trainer.max_steps", "6", *PERIODIC) == 0
    capsys.readouterr()
    small_volume(root=tmp_path / "full")
    assert fit(tmp_path / "full", "--trainer.max_steps", "6", *PERIODIC) == 2
    run = tmp_path / "full" / "dit" / "version_0"
    newest = run / "checkpoints" / "epoch=0-step=2.ckpt"
    line = error_line(capsys)
    assert f"writing {run / 'checkpoints' / 'epoch=0-step=4.ckpt'} (needs " in line
    assert f"already saved: {newest} (the newest complete checkpoint), {run / 'summary.json'}" in line
    assert sorted(path.name for path in newest.parent.iterdir()) == [newest.name]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert not leftovers(tmp_path)
    assert fit(tmp_path / "resumed", "--trainer.max_steps", "6", *PERIODIC, "--ckpt_path", str(newest)) == 0
    whole = read_checkpoint(tmp_path / "whole" / "dit" / "version_0" / "checkpoints" / "final.ckpt")
    resumed = read_checkpoint(tmp_path / "resumed" / "dit" / "version_0" / "checkpoints" / "final.ckpt")
    assert whole["global_step"] == resumed["global_step"] == 6
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


@pytest.mark.slow
def test_fit_out_of_space_in_tensorboard_events(tmp_path, monkeypatch, capsys):
    """TensorBoard writes from its own thread; the error comes back in the main thread as the one line."""
    from tensorboard.compat.tensorflow_stub.io import gfile

    append = gfile.LocalFileSystem.append

    def full_once_checkpointed(self, filename, file_content, binary_mode=False):
        if any(tmp_path.rglob("*.ckpt")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return append(self, filename, file_content, binary_mode)

    monkeypatch.setattr(gfile.LocalFileSystem, "append", full_once_checkpointed)
    assert fit(tmp_path, "--trainer.max_steps", "30", "--trainer.log_every_n_steps", "1", *PERIODIC) == 2
    run = tmp_path / "dit" / "version_0"
    line = error_line(capsys)
    events = next(run.glob("events.out.tfevents.*"))
    assert line.startswith(f"ditlab: error: no space left on device writing {events} (")
    assert "); it may be incomplete; already saved: " in line  # append-only: the events before it are kept
    assert "(the newest complete checkpoint)" in line and str(run / "summary.json") in line
