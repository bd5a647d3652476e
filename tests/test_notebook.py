"""notebooks/evaluate.ipynb runs top to bottom on a tiny teacher and a tiny dicomp student made here;
notebooks/board.ipynb rebuilds the board from a results folder and shows the same rows as board.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
import yaml

from ditlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "evaluate.ipynb"
BOARD_NOTEBOOK = ROOT / "notebooks" / "board.ipynb"


def inject_parameters(notebook: nbformat.NotebookNode, **values) -> nbformat.NotebookNode:
    """Papermill-style: a cell assigning ``values`` right after the cell tagged ``parameters``."""
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, cell)
    return notebook


def write_config(
    path: Path, base: str, runs: Path, callbacks: dict[str, dict], model: dict, trainer: dict
) -> Path:
    """``configs/<base>`` with the given callback ``init_args`` (by class name suffix) and overrides."""
    config = yaml.safe_load((ROOT / "configs" / base).read_text())
    config["trainer"].update(logger={**config["trainer"]["logger"]}, enable_progress_bar=False, **trainer)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(runs)
    listed = {
        callback["class_path"].rsplit(".", 1)[-1]: callback for callback in config["trainer"]["callbacks"]
    }
    for name, init_args in callbacks.items():
        if name in listed:
            listed[name]["init_args"].update(init_args)
        else:
            config["trainer"]["callbacks"].append(
                {"class_path": f"ditlab.callbacks.evaluation.{name}", "init_args": init_args}
            )
    for key, value in model.items():
        target = config["model"]["init_args"]
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    config["data"]["init_args"]["batch_size"] = 16
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> list[Path]:
    """A 6-block digits DiT fit for 10 steps (with in-loop FID) and a 6 -> 4 -> 3 block dicomp student of it."""
    folder = tmp_path_factory.mktemp("notebook")
    teacher_config = write_config(
        folder / "dit.yaml", "dit.yaml", folder / "runs",
        callbacks={"SampleGrid": {"every_n_steps": 0, "per_class": 1},
                   "Evaluation": {"every_n_steps": 5, "num_samples": 20}},
        model={"network.hidden_size": 32, "network.depth": 6, "network.num_heads": 2, "sampling.steps": 4},
        trainer={"max_steps": 10, "val_check_interval": 5},
    )  # fmt: skip
    assert main(["fit", "--config", str(teacher_config)]) == 0
    teacher = folder / "runs" / "dit" / "version_0"
    student_config = write_config(
        folder / "dicomp.yaml", "dicomp.yaml", folder / "runs",
        callbacks={"ProgressiveDistillation": {"at_steps": [4], "blocks": [3]},
                   "SampleGrid": {"every_n_steps": 0, "per_class": 1},
                   "CompressionReport": {"num_samples": 20, "throughput_batch": 8, "steps": 4}},
        model={"teacher.checkpoint": str(teacher / "checkpoints" / "final.ckpt"), "prune.num_blocks": 4,
               "prune.calibration_images": 32, "warmup_steps": 0},
        trainer={"max_steps": 8, "val_check_interval": 4},
    )  # fmt: skip
    assert main(["fit", "--config", str(student_config)]) == 0
    return [teacher, folder / "runs" / "dicomp" / "version_0"]


@pytest.mark.slow
def test_evaluate_notebook_runs_on_a_teacher_and_its_student(tiny_runs, tmp_path):
    from nbclient import NotebookClient

    figures = tmp_path / "figures"
    notebook = inject_parameters(nbformat.read(NOTEBOOK, as_version=4), RUNS=[str(path) for path in tiny_runs],
                                 PER_CLASS=2, NFE_STEPS=(2, 4), NFE_SAMPLES=20, LATENCY_BATCH=4,
                                 FIGURES=str(figures))  # fmt: skip
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()

    assert sorted(path.name for path in figures.glob("*.png")) == ["fid.png", "grids.png", "side_by_side.png"]
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("data", {}).get("text/markdown", ""))
            assert output.get("output_type") != "error", output
    tables = "\n".join(texts)
    assert (
        "dit/version_0" in tables
        and "dicomp/version_0 [teacher]" in tables
        and "dicomp/version_0 [student]" in tables
    )
    assert "| run | steps | nfe | fid |" in tables and "ms_per_image" in tables
    summary = json.loads((tiny_runs[1] / "summary.json").read_text())
    assert summary["student"]["blocks"] == 3 and summary["teacher"]["blocks"] == 6


@pytest.mark.slow
def test_default_runs_are_the_newest_under_the_root(tiny_runs, tmp_path):
    from ditlab import analysis

    root = tiny_runs[0].parents[1]
    assert analysis.find_runs(root, newest=1) == [tiny_runs[1]]  # the student finished last
    steps = analysis.fid_vs_step(analysis.load_run(tiny_runs[0]))
    assert [step for step, _ in steps] == [5, 10] and all(value > 0 for _, value in steps)


@pytest.mark.slow
@pytest.mark.parametrize("only_v2", [False, True])
def test_board_notebook_shows_the_rows_board_py_writes(tmp_path, only_v2):
    from nbclient import NotebookClient

    notebook = inject_parameters(nbformat.read(BOARD_NOTEBOOK, as_version=4), RESULTS=str(ROOT / "bench" / "results"),
                                 OUT=str(tmp_path), PROTOCOL_V2_ONLY=only_v2)  # fmt: skip
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

    board = json.loads((tmp_path / "board.json").read_text())
    assert (tmp_path / "board.png").stat().st_size > 10_000 and board["rows"]
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    counts = re.search(r"(\d+) of (\d+) digits rows and (\d+) of (\d+) scenes rows shown", text)
    expected = [r for r in board["rows"] if r["protocol_v2"] == "yes" or not only_v2]
    scenes = [r for r in board["scenes"] if r["protocol_v2"] == "yes" or not only_v2]
    assert (int(counts.group(1)), int(counts.group(3))) == (len(expected), len(scenes))
    expected += scenes
    tables = "".join(output.get("data", {}).get("text/markdown", "") for output in outputs)
    assert all(row["setting"] in tables for row in expected)
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 1
