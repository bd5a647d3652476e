"""Thread choice: ``--threads`` beats ``OMP_NUM_THREADS`` beats the cores free now (at least one); bad values are
refused in one line; ``ditlab fit`` records its threads, cores and load in summary.json."""

from __future__ import annotations

import pytest

from ditlab import threads


def test_the_order_of_choice(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (5.4, 1.0, 1.0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads(2) == (2, "--threads")
    assert threads.choose_threads() == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.choose_threads()[0] == 3  # 8 cores, 5 busy
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (12.0, 1.0, 1.0))
    assert threads.choose_threads()[0] == 1  # a crowded node still gets one thread


def test_the_option_is_taken_out_of_the_arguments():
    assert threads.pop_threads_option(["fit", "--threads", "2", "--config", "a.yaml"]) == (["fit", "--config", "a.yaml"], 2)
    assert threads.pop_threads_option(["sample", "--threads=1"]) == (["sample"], 1)
    assert threads.pop_threads_option(["fit"]) == (["fit"], None)
    for bad in (["fit", "--threads", "0"], ["fit", "--threads", "two"], ["fit", "--threads"]):
        with pytest.raises(ValueError, match="positive number of torch threads"):
            threads.pop_threads_option(bad)


def test_fit_records_where_it_ran(tiny_args, tmp_path):
    import json

    import torch

    from ditlab.cli import main

    before = torch.get_num_threads()
    try:
        assert main(["fit", "--threads", "1", *tiny_args, "--trainer.max_steps", "2",
                     "--trainer.default_root_dir", str(tmp_path)]) == 0  # fmt: skip
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    summary = json.loads(next(tmp_path.glob("runs/**/summary.json")).read_text())
    machine = summary["machine"]
    assert machine["torch_threads"] == 1 and machine["processes"] == 1 and machine["cores"] >= 1
    assert len(machine["load_average"]) == 3 and len(machine["load_average_at_end"]) == 3
