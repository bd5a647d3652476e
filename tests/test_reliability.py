"""Issue 9: exact resume (weights, EMA, optimiser, losses), SIGTERM/SIGKILL, atomic checkpoint writes, NaN guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from ditlab.atomic import save_torch
from ditlab.callbacks.evaluation import Evaluation
from ditlab.callbacks.reliability import NaNGuard
from ditlab.checkpoint import read_checkpoint
from ditlab.checkpoint_io import AtomicCheckpointIO
from ditlab.cli import build_cli, main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("reliability_run.py")
# 1617 training digits at batch 512: 3 batches per epoch, so 8 steps cross two epoch boundaries
FAST = ["--data.init_args.batch_size", "512", "--trainer.val_check_interval", "4",
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "1"]  # fmt: skip


class Recorder(L.Callback):
    """Loss and first training label of every optimiser step, keyed by the step's index."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.labels: dict[int, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step - 1] = float(outputs["loss"])
        self.labels[trainer.global_step - 1] = int(batch[1][:8].sum())


def fit(args: list[str], callbacks: list[L.Callback], ckpt_path: str | None = None) -> L.Trainer:
    cli = build_cli(args, run=False)
    cli.trainer.callbacks[:0] = callbacks  # before ModelCheckpoint, as user callbacks are
    try:
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    except SystemExit:
        pass
    return cli.trainer


def assert_same_state(first: dict, second: dict) -> None:
    """Weights, EMA weights, optimiser moments and scheduler state are bitwise equal."""
    assert first["global_step"] == second["global_step"]
    assert first["state_dict"].keys() == second["state_dict"].keys()
    assert any(key.startswith("ema.") for key in first["state_dict"])
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key
    (opt_a,), (opt_b,) = first["optimizer_states"], second["optimizer_states"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][index][name])), (
                index,
                name,
            )
    assert first["lr_schedulers"] == second["lr_schedulers"]


def interrupted_and_resumed(
    args: list[str], interrupt: L.Callback, total: int, extra=()
) -> tuple[Recorder, Recorder, Path]:
    """Stop where ``interrupt`` (an ``interrupt_at(step)``) presses Ctrl-C, which is before the periodic
    checkpoint of that step, then resume to ``total``; returns both recorders and the resumed final.ckpt."""
    first = Recorder()
    trainer = fit([*args, "--trainer.max_steps", str(total)], [first, interrupt, *[e() for e in extra]])
    saved = Path(trainer.log_dir) / "checkpoints" / "interrupted.ckpt"
    assert read_checkpoint(saved)["global_step"] == interrupt.at
    second = Recorder()
    trainer = fit([*args, "--trainer.max_steps", str(total)], [second, *[e() for e in extra]], str(saved))
    return first, second, Path(trainer.log_dir) / "checkpoints" / "final.ckpt"


@pytest.mark.parametrize("stop", [2, 3, 5])  # mid-epoch, at an epoch boundary, after a validation step
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tiny_args, stop, interrupt_at):
    args = [*tiny_args, *FAST]
    straight = Recorder()
    trainer = fit([*args, "--trainer.max_steps", "8"], [straight])
    reference = read_checkpoint(Path(trainer.log_dir) / "checkpoints" / "final.ckpt")
    first, second, resumed = interrupted_and_resumed(args, interrupt_at(stop), 8)
    assert sorted(second.losses) == list(range(stop, 8))
    assert {**first.losses, **second.losses} == straight.losses  # exact float equality, step by step
    assert {**first.labels, **second.labels} == straight.labels  # same batches, in the same order
    assert_same_state(reference, read_checkpoint(resumed))


def test_resume_across_an_evaluation_step(tiny_args, tmp_path, interrupt_at):
    class TinyEvaluation(Evaluation):
        def __init__(self) -> None:
            super().__init__(every_n_steps=3, num_samples=8, steps=2, cache_dir=str(tmp_path / "cache"))

    args = [*tiny_args, *FAST, "--trainer.val_check_interval", "100"]
    straight = Recorder()
    evaluation = TinyEvaluation()
    trainer = fit([*args, "--trainer.max_steps", "6"], [straight, evaluation])
    reference = read_checkpoint(Path(trainer.log_dir) / "checkpoints" / "final.ckpt")
    first, second, resumed = interrupted_and_resumed(args, interrupt_at(4), 6, extra=[TinyEvaluation])
    assert {**first.losses, **second.losses} == straight.losses
    final = read_checkpoint(resumed)
    assert_same_state(reference, final)
    (state,) = [v for k, v in final["callbacks"].items() if "TinyEvaluation" in k]
    assert state["last_step"] == 6 and state["last_metrics"] == evaluation.last_metrics


def test_the_periodic_checkpoint_holds_the_ema_of_its_own_step(tiny_args):
    args = [*tiny_args, *FAST, "--trainer.max_steps", "2"]
    trainer = fit(args, [])
    ckpt = Path(trainer.log_dir) / "checkpoints"
    final = read_checkpoint(ckpt / "final.ckpt")
    cli = build_cli([*args, "--trainer.max_steps", "2"], run=False)
    periodic = ModelCheckpointAt(2)
    cli.trainer.callbacks.insert(0, periodic)
    cli.trainer.fit(cli.model, cli.datamodule)
    for key, value in final["state_dict"].items():
        assert torch.equal(value, periodic.saved["state_dict"][key]), key


class ModelCheckpointAt(L.Callback):
    """What a ``ModelCheckpoint`` saving in ``on_train_batch_end`` at step ``at`` sees."""

    def __init__(self, at: int) -> None:
        self.at, self.saved = at, {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.at:
            self.saved = {"state_dict": {k: v.clone() for k, v in pl_module.state_dict().items()}}


# ------------------------------------------------------------------------------------------- NaN guard
class PoisonLoss(L.Callback):
    """Makes the loss NaN (``kind="loss"``) or one gradient inf (``"grad"``) at the given steps."""

    def __init__(self, steps: set[int], kind: str = "loss") -> None:
        self.steps, self.kind = steps, kind

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.kind == "loss" and trainer.global_step in self.steps:
            loss.data.fill_(float("nan"))

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step in self.steps:
            if self.kind == "grad":
                next(p for p in pl_module.network.parameters() if p.grad is not None).grad.view(-1)[0] = (
                    float("inf")
                )
            else:  # a NaN loss gives NaN gradients
                for param in pl_module.network.parameters():
                    if param.grad is not None:
                        param.grad.fill_(float("nan"))


class Snapshots(L.Callback):
    def __init__(self) -> None:
        self.weights: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.weights[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nan_guard_skips_bad_steps_without_touching_weights_or_ema(tiny_args, kind):
    snapshots = Snapshots()
    trainer = fit([*tiny_args, *FAST, "--trainer.max_steps", "6"], [PoisonLoss({2, 3}, kind), snapshots])
    guard = next(c for c in trainer.callbacks if isinstance(c, NaNGuard))
    assert guard.skipped == 2 and guard.in_a_row == 0
    for step in (3, 4):  # after steps 2 and 3 (skipped) everything equals the state after step 2
        for key, value in snapshots.weights[2].items():
            assert torch.equal(value, snapshots.weights[step][key]), (step, key)
    assert not torch.equal(snapshots.weights[4]["network.final_layer.linear.weight"],
                           snapshots.weights[5]["network.final_layer.linear.weight"])  # fmt: skip
    final = read_checkpoint(Path(trainer.log_dir) / "checkpoints" / "final.ckpt")
    assert all(torch.isfinite(v).all() for v in final["state_dict"].values())
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 2


def test_nan_guard_stops_after_max_bad_steps_in_a_row(tiny_args, capsys):
    snapshots = Snapshots()
    with pytest.raises(ValueError, match="3 steps in a row had a non-finite loss"):
        cli = build_cli(
            [*tiny_args, *FAST, "--trainer.max_steps", "20", "--nan_guard.max_bad_steps", "3"], run=False
        )
        cli.trainer.callbacks[:0] = [PoisonLoss(set(range(2, 20))), snapshots]
        cli.trainer.fit(cli.model, cli.datamodule)
    saved = read_checkpoint(Path(cli.trainer.log_dir) / "checkpoints" / "interrupted.ckpt")
    for key, value in snapshots.weights[2].items():  # the last good weights (after step 2)
        assert torch.equal(value, saved["state_dict"][key]), key


def test_nan_guard_stop_is_one_line_from_the_command(tiny_args, capsys, monkeypatch):
    import ditlab.callbacks.reliability as reliability

    monkeypatch.setattr(reliability.NaNGuard, "on_before_backward",
                        lambda self, trainer, module, loss: setattr(self, "_loss_finite", False))  # fmt: skip
    assert (
        main(["fit", *tiny_args, *FAST, "--trainer.max_steps", "10", "--nan_guard.max_bad_steps", "2"]) == 2
    )
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "2 steps in a row had a non-finite loss (last at step 1)" in error[0]


# ------------------------------------------------------------------------------------------- atomic writes
def test_atomic_save_keeps_the_old_file_when_the_write_dies(tmp_path):
    path = tmp_path / "last.ckpt"
    save_torch({"step": 1, "w": torch.ones(3)}, path)

    class Explodes:
        def __reduce__(self):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_torch({"step": 2, "w": torch.zeros(1000), "bad": Explodes()}, path)
    assert torch.load(path, weights_only=False)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    with pytest.raises(OSError):
        save_torch({"bad": Explodes()}, tmp_path / "new.ckpt")
    assert not (tmp_path / "new.ckpt").exists()


def test_checkpoint_io_is_the_default_and_reads_corrupt_files_in_one_line(tiny_args, tmp_path):
    cli = build_cli([*tiny_args, "--trainer.max_steps", "1"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        AtomicCheckpointIO().load_checkpoint(broken)


@pytest.mark.slow
def test_sigkill_mid_write_never_leaves_a_partial_file(tmp_path):
    """A child process rewrites a 40 MB checkpoint in a loop; SIGKILL it at random moments."""
    path = tmp_path / "big.ckpt"
    code = ("import sys, torch; from ditlab.atomic import save_torch\n"
            "i = 0\nwhile True:\n    save_torch({'i': i, 'w': torch.full((10_000_000,), float(i))}, sys.argv[1])\n"
            "    i += 1; print(i, flush=True)\n")  # fmt: skip
    for delay in (0.3, 0.55, 0.8):
        child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
        child.stdout.readline()  # one complete write exists
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        state = torch.load(path, weights_only=False)
        assert torch.equal(state["w"], torch.full((10_000_000,), float(state["i"])))


# ------------------------------------------------------------------------------------------- signals
def start_run(tmp_path: Path, tiny_args: list[str], *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, str(SCRIPT), "fit", *tiny_args, *FAST, "--trainer.max_steps", "400",
            "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "5",
            "--trainer.callbacks.save_last", "true", *extra]  # fmt: skip
    stderr = open(tmp_path / "stderr.txt", "w")  # a file, so a chatty child never blocks on a full pipe
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=ROOT)


def wait_for_step(child: subprocess.Popen, step: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    for line in child.stdout:
        if line.startswith("step ") and int(line.split()[1]) >= step:
            return
        assert time.time() < deadline, "the training subprocess did not reach its step in time"
    raise AssertionError(f"the run ended before step {step} (exit code {child.wait()})")


@pytest.mark.slow
def test_sigterm_saves_interrupted_ckpt_and_exits_cleanly(tmp_path, tiny_args):
    child = start_run(tmp_path, tiny_args)
    wait_for_step(child, 7)
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=60)
    out, err = child.stdout.read(), (tmp_path / "stderr.txt").read_text()  # read() keeps the buffered lines
    assert child.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    saved = next(tmp_path.glob("runs/dit/version_0/checkpoints/interrupted.ckpt"))
    step = read_checkpoint(saved)["global_step"]
    assert f"received SIGTERM; stopped after step {step}" in out and f"interrupted at step {step}" in out
    assert 7 <= step <= 8  # the step that was running when the signal came, no further
    summary = json.loads(next(tmp_path.glob("runs/dit/version_0/summary.json")).read_text())
    assert summary["steps"] == step and summary["stopped"] == f"terminated (SIGTERM) after step {step}"
    assert summary["train_images_per_s"] > 0 and summary["machine"]["torch_threads"] >= 1
    assert (
        main(["fit", *tiny_args, *FAST, "--trainer.max_steps", str(step + 2), "--ckpt_path", str(saved)]) == 0
    )


@pytest.mark.slow
def test_sigkill_loses_at_most_one_checkpoint_interval(tmp_path, tiny_args):
    child = start_run(tmp_path, tiny_args)
    wait_for_step(child, 13)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    reached = max(
        [13] + [int(line.split()[1]) for line in child.stdout.read().splitlines() if line.startswith("step ")]
    )
    last = next(tmp_path.glob("runs/dit/version_0/checkpoints/last.ckpt"))
    step = read_checkpoint(last)["global_step"]
    assert step % 5 == 0 and reached - 5 <= step <= reached  # lost at most one interval (5 steps)
    for ckpt in last.parent.glob("*.ckpt"):  # every file at a final path is complete (a .tmp file may remain)
        assert read_checkpoint(ckpt)["global_step"] % 5 == 0
    assert (
        main(["fit", *tiny_args, *FAST, "--trainer.max_steps", str(step + 2), "--ckpt_path", str(last)]) == 0
    )


# ------------------------------------------------------------------------------------------- dicomp stages
def compress_tests():
    """tests/methods/compress/test_module.py as a module (its config helper names its callbacks by module)."""
    import importlib.util

    if "dicomp_test_helpers" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "dicomp_test_helpers", ROOT / "tests" / "methods" / "compress" / "test_module.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["dicomp_test_helpers"] = module
        spec.loader.exec_module(module)
    return sys.modules["dicomp_test_helpers"]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A 6-block digits teacher (20 steps), as in tests/methods/compress/test_module.py."""
    tiny_teacher = compress_tests().TINY_TEACHER
    runs = tmp_path_factory.mktemp("teacher")
    assert main(["fit", "--config", str(ROOT / "configs" / "dit.yaml"), *tiny_teacher[:-1], "20",
                 "--trainer.logger.init_args.save_dir", str(runs)]) == 0  # fmt: skip
    return next(runs.glob("dit/version_0/checkpoints/final.ckpt"))


@pytest.mark.parametrize("stop", [2, 4])  # before and after the stage change at step 3
def test_resume_across_a_progressive_stage_is_bitwise(tmp_path, teacher_ckpt, stop, interrupt_at):
    config = compress_tests().dicomp_config(tmp_path, teacher_ckpt, [3], [2])
    args = [
        "--config",
        str(config),
        "--trainer.val_check_interval",
        "100",
        "--trainer.limit_val_batches",
        "1",
    ]
    straight = Recorder()
    trainer = fit([*args, "--trainer.max_steps", "6"], [straight])
    reference = read_checkpoint(Path(trainer.log_dir) / "checkpoints" / "final.ckpt")
    first, second, resumed = interrupted_and_resumed(args, interrupt_at(stop), 6)
    assert {**first.losses, **second.losses} == straight.losses
    final = read_checkpoint(resumed)
    assert_same_state(reference, final)
    assert len(final["dicomp"]["keep"]) == 2 and final["dicomp"] == reference["dicomp"]


# ------------------------------------------------------------------------------------------- alignment
def haste_config(tmp_path: Path, stop: int) -> Path:
    """configs/haste.yaml at tiny size with only the termination callback (alignment off from ``stop``)."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "haste.yaml").read_text())
    config["trainer"].update(enable_progress_bar=False, val_check_interval=100, limit_val_batches=1)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["trainer"]["callbacks"] = [
        {"class_path": "ditlab.callbacks.alignment.AlignmentTermination", "init_args": {"step": stop}}
    ]
    model = config["model"]["init_args"]
    model["network"].update(hidden_size=32, depth=4, num_heads=2)
    model["feature"].update(blocks=[2], projector_hidden=48)
    model["attention"].update(blocks=[1, 2], encoder_blocks=[1, 2], heads="mean")
    model["sampling"]["steps"] = 2
    model["warmup_steps"] = 0
    config["data"]["init_args"]["batch_size"] = 16
    path = tmp_path / "haste.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.skipif(
    not (ROOT / "ditlab" / "callbacks" / "alignment.py").is_file(), reason="no alignment callback"
)
@pytest.mark.parametrize("stop", [2, 4])  # before and after alignment terminates at step 3
def test_resume_across_the_alignment_termination_is_bitwise(tmp_path, stop, interrupt_at):
    args = ["--config", str(haste_config(tmp_path, stop=3))]
    straight = Recorder()
    trainer = fit([*args, "--trainer.max_steps", "6"], [straight])
    reference = read_checkpoint(Path(trainer.log_dir) / "checkpoints" / "final.ckpt")
    first, second, resumed = interrupted_and_resumed(args, interrupt_at(stop), 6)
    assert {**first.losses, **second.losses} == straight.losses
    final = read_checkpoint(resumed)
    assert_same_state(reference, final)
    assert final["align"]["terminated_at"] == 3 == reference["align"]["terminated_at"]
