"""Issue 9: every bad input ends in one ``ditlab: error: ...`` line naming it, a non-zero exit and no traceback.

Extends the table in ``tests/test_cli.py`` (misspelt model/trainer keys, bad lr, objective kind, val_fraction,
digits batch size, patch 3, ema_decay) with files, checkpoints, offline weights, datasets and tools.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from ditlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIT = str(ROOT / "configs" / "dit.yaml")
TINY = ["--model.init_args.network.hidden_size", "32", "--model.init_args.network.depth", "2",
        "--model.init_args.network.num_heads", "2", "--model.init_args.sampling.steps", "2",
        "--data.init_args.batch_size", "16", "--trainer.enable_progress_bar", "false"]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints (a good one, a wider one, a 'pruned' 2-block student, broken copies) and folders."""
    root = tmp_path_factory.mktemp("bad_inputs")
    made = {}
    for name, extra in {"good": [], "wide": ["--model.init_args.network.hidden_size", "48"]}.items():
        assert main(["fit", "--config", DIT, *TINY, *extra, "--trainer.max_steps", "1", "--trainer.logger.init_args.save_dir",
                     str(root / name)]) == 0  # fmt: skip
        made[name] = next((root / name).glob("dit/version_0/checkpoints/final.ckpt"))
    for name in (
        "good",
        "wide",
    ):  # as converted or hand-edited checkpoints are: weights without hyperparameters
        checkpoint = torch.load(made[name], weights_only=False)
        checkpoint.pop("hyper_parameters")
        torch.save(checkpoint, root / f"{name}_bare.ckpt")
        made[f"{name}_bare"] = root / f"{name}_bare.ckpt"
    data = made["good"].read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (root / "garbage.ckpt").write_bytes(bytes(range(256)) * 64)
    torch.save({"weights": torch.zeros(3)}, root / "foreign.ckpt")
    made.update(
        truncated=root / "truncated.ckpt", garbage=root / "garbage.ckpt", foreign=root / "foreign.ckpt"
    )
    (root / "empty" / "cat").mkdir(parents=True)
    (root / "few" / "cat").mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (8, 8)).save(root / "few" / "cat" / f"{index}.png")
    (root / "bad.yaml").write_text("model: [unclosed\n  - : :")
    (root / "typo.yaml").write_text("model:\n  init_args:\n    lrr: 0.1\n")
    made.update(root=root, empty=root / "empty", few=root / "few")
    return made


FOLDER = ["--data", "ditlab.data.images.ImageFolderDataModule", "--data.init_args.image_size", "16",
          "--data.init_args.num_workers", "0", "--model.init_args.network.in_channels", "3"]  # fmt: skip

# (case id, argv builder, expected text in the one line)
CASES = [
    ("misspelt section", lambda f: ["fit", "--config", DIT, "--trainr.max_steps", "3"], "unknown option --trainr.max_steps"),
    ("misspelt data key", lambda f: ["fit", "--config", DIT, "--data.init_args.batch_sise", "4"], "batch_sise"),
    ("typo in a config file", lambda f: ["fit", "--config", DIT, "--config", str(f["root"] / "typo.yaml")], "lrr"),
    ("int given text", lambda f: ["fit", "--config", DIT, "--trainer.max_steps", "abc"], "max_steps"),
    ("int given a float", lambda f: ["fit", "--config", DIT, "--data.init_args.image_size", "1.5"], "image_size"),
    ("unknown class", lambda f: ["fit", "--config", DIT, "--model", "ditlab.methods.nope.Module"], "ditlab.methods.nope"),
    ("malformed yaml", lambda f: ["fit", "--config", str(f["root"] / "bad.yaml")], "bad.yaml); check its YAML syntax"),
    ("config is a folder", lambda f: ["fit", "--config", str(f["root"])], str(Path("bad_inputs"))),
    ("nan guard type", lambda f: ["fit", "--config", DIT, "--nan_guard.max_bad_steps", "x"], "max_bad_steps"),
    ("missing --ckpt_path", lambda f: ["fit", "--config", DIT, *TINY, "--ckpt_path", str(f["root"] / "nope.ckpt")],
     "nope.ckpt does not exist"),
    ("truncated --ckpt_path", lambda f: ["fit", "--config", DIT, *TINY, "--ckpt_path", str(f["truncated"])],
     "truncated.ckpt is truncated or corrupt"),
    ("garbage --ckpt_path", lambda f: ["fit", "--config", DIT, *TINY, "--ckpt_path", str(f["garbage"])],
     "garbage.ckpt is truncated or corrupt"),
    ("plain torch.save --ckpt_path", lambda f: ["fit", "--config", DIT, *TINY, "--ckpt_path", str(f["foreign"])],
     "foreign.ckpt is not a Lightning checkpoint (a plain torch.save file?); --ckpt_path resumes a run"),
    ("other width --ckpt_path", lambda f: ["fit", "--config", DIT, *TINY, "--ckpt_path", str(f["wide_bare"])],
     "network.pos_embed: [1, 16, 48] in the checkpoint vs [1, 16, 32] here"),
    ("pruned student as the full model", lambda f: ["fit", "--config", DIT, *TINY, "--model.init_args.network.depth",
     "4", "--ckpt_path", str(f["good_bare"])], "missing ['network.blocks.2."),
    ("truncated to sample", lambda f: ["sample", "--ckpt", str(f["truncated"]), "--num", "2", "--out", str(f["root"] / "s")],
     "truncated.ckpt is truncated or corrupt"),
    ("garbage to sample", lambda f: ["sample", "--ckpt", str(f["garbage"]), "--num", "2", "--out", str(f["root"] / "s")],
     "is truncated or corrupt"),
    ("missing to sample", lambda f: ["sample", "--ckpt", str(f["root"] / "gone.ckpt"), "--num", "2", "--out", "x"],
     "gone.ckpt does not exist"),
    ("not a ditlab checkpoint", lambda f: ["sample", "--ckpt", str(f["foreign"]), "--num", "2", "--out", "x"],
     "not a ditlab checkpoint"),
    ("sample zero images", lambda f: ["sample", "--ckpt", str(f["good"]), "--num", "0", "--out", "x"], "--num 0: ask for at least one image"),
    ("sample unknown class", lambda f: ["sample", "--ckpt", str(f["good"]), "--num", "2", "--class", "12", "--out", "x"],
     "--class 12 is out of range"),
    ("missing VAE folder", lambda f: ["fit", "--config", DIT, *TINY, "--model.init_args.vae", str(f["root"] / "no_vae"),
     "--trainer.max_steps", "1"], "no_vae"),
    ("missing Inception weights", lambda f: ["eval", "--ckpt", str(f["good"]), "--num", "4", "--features", "inception-v3",
     "--inception-weights", str(f["root"] / "no_inception.pth")], "no_inception.pth do not exist"),
    ("dataset folder with no images", lambda f: ["fit", "--config", DIT, *TINY, *FOLDER, "--data.init_args.root",
     str(f["empty"])], "has no images"),
    ("batch larger than the dataset", lambda f: ["fit", "--config", DIT, *TINY, *FOLDER, "--data.init_args.root",
     str(f["few"]), "--data.init_args.batch_size", "8", "--data.init_args.val_fraction", "0"], "data.batch_size=8"),
    ("image size not divisible by patch", lambda f: ["fit", "--config", DIT, *TINY, "--data.init_args.image_size",
     "18"], "not divisible by patch_size=4"),
]  # fmt: skip


@pytest.mark.parametrize("argv, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_clear_line(argv, expected, files, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # tools that write (sample, eval) write here
    code = main(argv(files))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code != 0
    assert "Traceback" not in captured.err + captured.out
    assert len(lines) == 1 and lines[0].startswith("ditlab: error: "), captured.err[-3000:]
    assert expected in lines[0]


def test_the_table_has_at_least_twenty_cases():
    assert len(CASES) >= 20 and len({case[0] for case in CASES}) == len(CASES)
