"""Run inside the processes of ``tests/test_teacher_process.py``.

``PrintTeacherStep`` goes into the teacher recipe (``--trainer.callbacks+=teacher_run.PrintTeacherStep``, with
``tests/`` on ``PYTHONPATH``): the teacher's ``ditlab fit`` child prints ``teacher step N`` after every optimiser
step, paced so that a test can signal it mid-build. ``python tests/teacher_run.py CONFIG.json`` builds the teacher
that a JSON ``TeacherConfig`` describes, as a second job sharing the cache would.
"""

from __future__ import annotations

import json
import sys
import time

import lightning as L


class PrintTeacherStep(L.Callback):
    def __init__(self, pause: float = 0.05) -> None:
        self.pause = pause

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        print(f"teacher step {trainer.global_step}", flush=True)
        time.sleep(self.pause)


if __name__ == "__main__":
    from ditlab.methods.teacher import TeacherConfig, build_from_recipe

    with open(sys.argv[1]) as handle:
        print(f"built {build_from_recipe(TeacherConfig(**json.load(handle)))}", flush=True)
