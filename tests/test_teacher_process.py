"""The teacher build (a child ``ditlab fit`` of the main job) stopped at any moment (issue 25).

The main job is ``configs/dicomp.yaml`` shrunk to seconds, its teacher a 2-block ``configs/dit.yaml`` of 40 steps
that prints each step (``tests/teacher_run.py``). SIGTERM, SIGKILL and SIGINT to the main job during the build
leave no process behind, INT/TERM end it like an interrupted fit (143 / 130, one line, no traceback) and every
next run resumes the build where the last one saved it; two jobs on one fresh cache build the teacher once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from ditlab.checkpoint import read_checkpoint
from ditlab.cli import main
from ditlab.methods.teacher import TeacherConfig, build_from_recipe, newest_checkpoint, recipe_target

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TEACHER_STEPS = 40


def recipe_args(steps: int = TEACHER_STEPS) -> list[str]:
    """A 2-block teacher of ``steps`` steps that prints ``teacher step N`` after each (paced at 50 ms)."""
    return ["--model.init_args.network.hidden_size", "32", "--model.init_args.network.depth", "2",
            "--model.init_args.network.num_heads", "2", "--model.init_args.sampling.steps", "2",
            "--data.init_args.batch_size", "8", "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.max_steps", str(steps),
            "--trainer.callbacks+=teacher_run.PrintTeacherStep"]  # fmt: skip


def environment() -> dict[str, str]:
    """The test's environment with ``tests/`` importable (the recipe names ``teacher_run.PrintTeacherStep``)."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}


def main_job_config(tmp_path: Path) -> Path:
    """configs/dicomp.yaml with the tiny teacher recipe (cached in ``tmp_path/cache``) and a 1-step student."""
    config = yaml.safe_load((ROOT / "configs" / "dicomp.yaml").read_text())
    config["trainer"].pop("callbacks", None)  # no progressive stages, sample grids or report: ditlab's defaults
    config["trainer"].update(max_steps=1, enable_progress_bar=False, num_sanity_val_steps=0,
                             logger={"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                     "init_args": {"save_dir": str(tmp_path / "runs"), "name": "dicomp"}})  # fmt: skip
    model = config["model"]["init_args"]
    model["teacher"] = {"recipe": str(ROOT / "configs" / "dit.yaml"), "recipe_args": recipe_args(),
                        "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    model["prune"].update(num_blocks=1, calibration_images=16)
    model["warmup_steps"] = 0
    config["data"]["init_args"]["batch_size"] = 8
    path = tmp_path / "dicomp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def teacher_steps(text: str) -> list[int]:
    return [int(step) for step in re.findall(r"^teacher step (\d+)$", text, re.MULTILINE)]


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (zombies, already dead, are left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:  # it ended while we looked
            pass
    return found


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def stop_main_job(tmp_path: Path, config: Path, signum: int) -> tuple[int, str, str]:
    """Start the main job, send ``signum`` once its teacher has trained 3 steps in this run; returns the step the
    build saved, the job's stdout and stderr (the teacher's output included)."""
    name = signal.Signals(signum).name
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        job = subprocess.Popen([sys.executable, "-m", "ditlab", "fit", "--config", str(config)], stdout=stdout,
                               stderr=stderr, env=environment(), cwd=tmp_path)  # fmt: skip
    wait_until(lambda: len(teacher_steps(out.read_text())) >= 3 or job.poll() is not None, 300, "no teacher step")
    assert job.poll() is None, err.read_text()[-3000:]
    job.send_signal(signum)
    sent = time.monotonic()
    job.wait(timeout=30)  # the main job exits within 30 s of the signal
    wait_until(lambda: not processes_naming(str(tmp_path)), 30 - (time.monotonic() - sent), "a process outlived it")
    assert job.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}[signum]
    saved = newest_checkpoint(recipe_target(TeacherConfig(**main_job_teacher(config))).parent / "run")
    assert saved is not None and saved.name == "interrupted.ckpt"  # SIGKILL too: the kernel sent the child SIGTERM
    step = read_checkpoint(saved)["global_step"]
    assert step - 1 <= max(teacher_steps(out.read_text())) <= step  # stopped after the step that was running
    return step, out.read_text(), err.read_text()


def main_job_teacher(config: Path) -> dict:
    return yaml.safe_load(config.read_text())["model"]["init_args"]["teacher"]


@pytest.mark.slow
def test_main_job_stopped_during_the_teacher_build_leaves_nothing_and_resumes(tmp_path, capfd, monkeypatch):
    config = main_job_config(tmp_path)
    saved = 0
    for signum in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT):
        step, out, err = stop_main_job(tmp_path, config, signum)
        steps = teacher_steps(out)
        assert steps[0] == saved + 1 and step > saved  # resumed where the previous run saved, then went on
        assert "Traceback" not in err
        if signum != signal.SIGKILL:  # the main job's own line, once
            how = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            lines = [line for line in out.splitlines() if line.startswith("teacher: the build of")]
            assert len(lines) == 1 and f"stopped ({how}); saved " in lines[0] and "resumes from it" in lines[0]
        saved = step
    monkeypatch.setenv("PYTHONPATH", environment()["PYTHONPATH"])
    capfd.readouterr()
    assert main(["fit", "--config", str(config)]) == 0  # the next run finishes the teacher, then the student
    out = capfd.readouterr().out
    assert "teacher: resuming the interrupted build" in out
    steps = teacher_steps(out)
    assert steps == list(range(saved + 1, TEACHER_STEPS + 1))  # fewer steps than a clean build's 40
    teacher = recipe_target(TeacherConfig(**main_job_teacher(config)))
    assert read_checkpoint(teacher)["global_step"] == TEACHER_STEPS
    assert next(tmp_path.glob("runs/dicomp/version_*/checkpoints/final.ckpt")).is_file()


@pytest.mark.slow
def test_two_jobs_on_one_fresh_cache_build_the_teacher_once(tmp_path, capsys, monkeypatch):
    config = TeacherConfig(recipe=str(ROOT / "configs" / "dit.yaml"), recipe_args=recipe_args(steps=6),
                           cache_dir=str(tmp_path / "cache"))  # fmt: skip
    (tmp_path / "teacher.json").write_text(json.dumps(asdict(config)))
    out = tmp_path / "first.out"
    with open(out, "w") as stdout:
        first = subprocess.Popen([sys.executable, str(TESTS / "teacher_run.py"), str(tmp_path / "teacher.json")],
                                 stdout=stdout, stderr=subprocess.STDOUT, env=environment(), cwd=tmp_path)  # fmt: skip
    wait_until(lambda: "training it once" in out.read_text() or first.poll() is not None, 300, "no build started")
    monkeypatch.setenv("PYTHONPATH", environment()["PYTHONPATH"])
    second = build_from_recipe(config)  # the lock is held: waits for the first job's build, then reuses it
    assert first.wait(timeout=300) == 0, out.read_text()[-3000:]
    ours = capsys.readouterr().out
    assert "waiting for it" in ours and "reusing" in ours and "training" not in ours
    assert f"built {second}" in out.read_text()
    assert len(list(second.parent.glob("run/teacher/version_*"))) == 1
    assert read_checkpoint(second)["global_step"] == 6
