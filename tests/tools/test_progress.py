"""``TaskProgress``: plain lines in a log (every tenth of the work, a closing line), a live bar in a terminal that
joins the fit's step bar when one is live, silence when disabled; and the tools and in-loop evaluation using it."""

from __future__ import annotations

import io
import re
import types

import torch
from rich.progress import Progress

from ditlab.progress import TaskProgress, duration, hosted_by


def run_task(total: int, step: int = 1, **options) -> list[str]:
    stream = io.StringIO()
    with TaskProgress("sampling", total, terminal=False, min_seconds=0.0, stream=stream, **options) as bar:
        for _ in range(0, total, step):
            bar.advance(step)
    return stream.getvalue().splitlines()


def test_log_lines_every_tenth_then_done():
    lines = run_task(100, step=5)
    assert len(lines) == 10  # 10%, 20%, ..., 90%, then "done"
    assert re.fullmatch(r"sampling: 10/100 images \(10%\) \| [\d.e+]+ images/s \| ETA \d+s", lines[0]), lines[0]
    assert lines[4].startswith("sampling: 50/100 images (50%)")
    assert re.fullmatch(r"sampling: done, 100 images in \d+s", lines[-1])


def test_lines_are_capped_by_min_seconds_and_lines():
    stream = io.StringIO()
    with TaskProgress("features", 50, unit="images", terminal=False, min_seconds=3600, stream=stream) as bar:
        for _ in range(50):
            bar.advance()
    (line,) = stream.getvalue().splitlines()  # a fast task: only "done"
    assert line.startswith("features: done, 50 images in")
    lines = run_task(30, lines=3)
    shown = [line.split(" |")[0] for line in lines[:-1]]
    assert shown == ["sampling: 10/30 images (33%)", "sampling: 20/30 images (67%)"]


def test_disabled_and_terminal_tasks_print_no_lines():
    assert run_task(10, enabled=False) == []
    stream = io.StringIO()
    host = Progress(disable=True)
    with hosted_by(host), TaskProgress("evaluation", 4, terminal=True, stream=stream) as bar:
        (task,) = host.tasks
        assert task.description == "evaluation" and task.total == 4
        bar.advance(3)
        assert host.tasks[0].completed == 3
    assert host.tasks == [] and stream.getvalue() == ""  # the task left the host bar; nothing written


def test_duration():
    assert [duration(s) for s in (42, 185, 3725)] == ["42s", "3m05s", "1h02m"]


def test_in_loop_evaluation_samples_in_batches_with_the_same_seeds_and_reports(capsys):
    """``Evaluation.sample_share`` = one ``pl_module.sample`` call (sample ``i`` from seed ``seed + start + i``), with
    progress lines prefixed by the run name in a log."""
    from ditlab.callbacks.evaluation import Evaluation

    def sample(labels, seed=0, start=0, **overrides):  # a deterministic stand-in for DiffusionModule.sample
        return torch.stack([torch.full((1, 2, 2), float(seed + start + i) + 0.01 * int(label))
                            for i, label in enumerate(labels)])  # fmt: skip

    module = types.SimpleNamespace(sample=sample, sampling=types.SimpleNamespace(batch_size=3))
    trainer = types.SimpleNamespace(is_global_zero=True, global_step=40, logger=types.SimpleNamespace(name="dit"))
    labels = torch.arange(10) % 4
    images = Evaluation(seed=5).sample_share(trainer, module, labels, start=20)
    assert torch.equal(images, sample(labels, seed=5, start=20))
    printed = capsys.readouterr().out
    assert "[dit] evaluation sampling at step 40: done, 10 images in" in printed
    trainer.is_global_zero = False
    Evaluation(seed=5).sample_share(trainer, module, labels, start=20)
    assert capsys.readouterr().out == ""  # other ranks are silent
