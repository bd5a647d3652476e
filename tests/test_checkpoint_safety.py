"""A checkpoint someone shared never runs code (issue 25): every ditlab reader loads plain data and ditlab configs.

The payload is a real ditlab checkpoint whose pickle calls ``exec`` when loaded (it writes a marker file): in its
hyper-parameters, in a sharded folder's byte entries, or as a sharded folder's DCP index. No command or loader
runs it, each says so in one line, and ``DITLAB_TRUST_CHECKPOINTS=1`` does run it (so the payload is live).
Checkpoints ditlab writes, including ones with config dataclasses in their hyper-parameters, still load and resume.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed.checkpoint as dcp

from ditlab.checkpoint_io import AtomicCheckpointIO
from ditlab.cli import main
from ditlab.data.digits import DigitsDataModule
from ditlab.diffusion.config import ObjectiveConfig
from ditlab.methods.base import DiffusionModule
from ditlab.methods.teacher import TeacherConfig, load_teacher
from ditlab.models.config import DiTConfig
from ditlab.models.loading import UntrustedCheckpointError, load_network, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DIT = str(ROOT / "configs" / "dit.yaml")
TINY = ["--model.init_args.network.hidden_size", "32", "--model.init_args.network.depth", "2",
        "--model.init_args.network.num_heads", "2", "--model.init_args.sampling.steps", "2",
        "--data.init_args.batch_size", "8", "--trainer.enable_progress_bar", "false"]  # fmt: skip


class Payload:
    """Pickles as ``exec(<write the marker>)``: loading it fully runs that code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


class CliPayload:
    """Names a ditlab callable that is not a config class (the CLI's ``main``): refused like any other."""

    def __reduce__(self):
        return main, (["--help"],)


def save_sharded(checkpoint: dict, folder: Path, extra: dict | None = None) -> Path:
    """``checkpoint`` as a DCP folder laid out like ``FSDP2Strategy``'s: tensors and ``extra`` in the shards (non-tensors
    as byte entries), everything else in ``meta.pt``."""
    shards = {"state_dict": checkpoint["state_dict"], **(extra or {})}
    dcp.save(shards, checkpoint_id=folder, no_dist=True)
    torch.save({key: value for key, value in checkpoint.items() if key != "state_dict"}, folder / "meta.pt")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny trained digits checkpoint, and payload copies of it (file, legacy file, sharded entries and index)."""
    root = tmp_path_factory.mktemp("safety")
    assert main(["fit", "--config", DIT, *TINY, "--trainer.max_steps", "2",
                 "--trainer.logger.init_args.save_dir", str(root / "runs")]) == 0  # fmt: skip
    good = next(root.glob("runs/dit/version_0/checkpoints/final.ckpt"))
    checkpoint = read_checkpoint(good)
    marker = root / "marker"
    torch.save({**checkpoint, "hyper_parameters": {**checkpoint["hyper_parameters"], "note": Payload(marker)}},
               root / "payload.ckpt")  # fmt: skip
    torch.save({**checkpoint, "loops": CliPayload()}, root / "cli_payload.ckpt")
    torch.save({**checkpoint, "note": Payload(marker)}, root / "legacy.ckpt", _use_new_zipfile_serialization=False)
    sharded = save_sharded(checkpoint, root / "sharded.ckpt", {"loops": {"fit": 1}})
    bytes_payload = save_sharded(checkpoint, root / "bytes_payload.ckpt", {"loops": {"note": Payload(marker)}})
    index_payload = save_sharded(checkpoint, root / "index_payload.ckpt")
    (index_payload / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    return {"root": root, "marker": marker, "good": good, "payload": root / "payload.ckpt", "sharded": sharded,
            "cli_payload": root / "cli_payload.ckpt", "legacy": root / "legacy.ckpt",
            "bytes_payload": bytes_payload, "index_payload": index_payload}  # fmt: skip


def run(files: dict, key: str) -> dict[str, list[str]]:
    """Every command that reads a checkpoint, given ``files[key]``."""
    path, out = str(files[key]), str(files["root"] / "out")
    return {
        "sample": ["sample", "--ckpt", path, "--num", "2", "--out", out],
        "eval": ["eval", "--ckpt", path, "--num", "4", "--out", out],
        "convert": ["convert", "--ckpt", path, "--out", out],
        "analyze": ["analyze", "--ckpt", path],
        "fit --ckpt_path": ["fit", "--config", DIT, *TINY, "--trainer.max_steps", "3", "--ckpt_path", path,
                            "--trainer.logger.init_args.save_dir", str(files["root"] / "resumed")],
        "dicomp teacher": ["fit", "--config", str(ROOT / "configs" / "dicomp.yaml"), "--trainer.max_steps", "1",
                           "--model.init_args.teacher.checkpoint", path, "--trainer.enable_progress_bar", "false",
                           "--trainer.logger.init_args.save_dir", str(files["root"] / "dicomp")],
    }  # fmt: skip


COMMANDS = ["sample", "eval", "convert", "analyze", "fit --ckpt_path", "dicomp teacher"]
PAYLOADS = {"payload": "builtins.exec", "bytes_payload": "builtins.exec", "index_payload": "builtins.exec",
            "cli_payload": "ditlab.cli.main", "legacy": "holds exec"}  # fmt: skip


@pytest.mark.parametrize("command, key", [(command, "payload") for command in COMMANDS] + [
    (command, key) for key in ("bytes_payload", "index_payload") for command in ("sample", "fit --ckpt_path",
                                                                                 "dicomp teacher")])  # fmt: skip
def test_no_command_runs_a_checkpoint_payload(files, command, key, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DITLAB_TRUST_CHECKPOINTS", raising=False)
    code = main(run(files, key)[command])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and "Traceback" not in captured.err + captured.out
    assert len(lines) == 1 and lines[0].startswith("ditlab: error: "), captured.err[-3000:]
    assert str(files[key]) in lines[0] and "builtins.exec" in lines[0] and "DITLAB_TRUST_CHECKPOINTS=1" in lines[0]
    assert not files["marker"].exists()


@pytest.mark.parametrize("key", list(PAYLOADS))
def test_no_loader_runs_a_checkpoint_payload(files, key, monkeypatch):
    monkeypatch.delenv("DITLAB_TRUST_CHECKPOINTS", raising=False)
    for load in (read_checkpoint, load_network, lambda path: load_teacher(
            TeacherConfig(checkpoint=str(path)), ObjectiveConfig(), None)):  # fmt: skip
        with pytest.raises(UntrustedCheckpointError, match=PAYLOADS[key]):
            load(files[key])
    assert not files["marker"].exists()


def test_trusting_a_file_loads_it_fully(files, monkeypatch):
    """The opt-in really unpickles everything: here it runs the payload, which proves the refusals above matter."""
    monkeypatch.setenv("DITLAB_TRUST_CHECKPOINTS", "1")
    read_checkpoint(files["bytes_payload"])
    assert files["marker"].read_text() == "ran"
    files["marker"].unlink()
    assert read_checkpoint(files["payload"])["hyper_parameters"]["note"] is None  # exec returns None
    assert files["marker"].read_text() == "ran"
    files["marker"].unlink()


def test_ditlab_checkpoints_load_and_resume_as_plain_data(files, tmp_path, monkeypatch):
    monkeypatch.delenv("DITLAB_TRUST_CHECKPOINTS", raising=False)
    written = read_checkpoint(files["good"])
    gathered = read_checkpoint(files["sharded"])  # a sharded folder gathers into the same dictionary
    assert gathered["loops"] == {"fit": 1} and gathered["ditlab"]["dit_config"] == written["ditlab"]["dit_config"]
    for key, value in written["state_dict"].items():
        assert torch.equal(gathered["state_dict"][key], value), key
    assert main(["fit", "--config", DIT, *TINY, "--trainer.max_steps", "3", "--ckpt_path", str(files["good"]),
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "resumed")]) == 0  # fmt: skip
    assert read_checkpoint(next(tmp_path.glob("resumed/dit/version_0/checkpoints/final.ckpt")))["global_step"] == 3

    # built in Python: the hyper-parameters are config dataclasses, allowlisted as the file names them
    network = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    module = DiffusionModule(network=network, objective=ObjectiveConfig(kind="flow"))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        plugins=[AtomicCheckpointIO()])  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=8, image_size=8))
    trainer.save_checkpoint(tmp_path / "python.ckpt")
    loaded = read_checkpoint(tmp_path / "python.ckpt")
    assert loaded["hyper_parameters"]["network"] == network and loaded["hyper_parameters"]["objective"].kind == "flow"
    resumed = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        plugins=[AtomicCheckpointIO()])  # fmt: skip
    resumed.fit(DiffusionModule(network=network, objective=ObjectiveConfig(kind="flow")),
                DigitsDataModule(batch_size=8, image_size=8), ckpt_path=tmp_path / "python.ckpt")  # fmt: skip
    assert resumed.global_step == 2
