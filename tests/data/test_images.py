"""Image folders (ADM centre crop, labels, skipped files, splits) and CIFAR-10's missing-files message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from ditlab.data.images import (
    CIFAR10DataModule,
    ImageFolderDataModule,
    SkippedImageWarning,
    center_crop_arr,
)

ROOT = Path(__file__).resolve().parents[2]


def make_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 7, corrupt: bool = True) -> Path:
    """``root/<class>/<i>.png`` with random 64x(64..) RGB images, plus one undecodable ``dog/broken.png``."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, (64 + 4 * index, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    if corrupt:
        (root / classes[1] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    (root / classes[0] / "notes.txt").write_text("not an image, not listed")
    return root


def test_center_crop_halves_with_box_then_crops_the_centre():
    # 300x128 -> BOX 150x64 -> BOX 75x32 (short side < 64 stops) -> BICUBIC to short side 32 (a no-op)
    # -> columns 21..52: two exact 2x2 averages, then the centre crop. PIL rounds each BOX step to uint8
    # (within 1 of the exact mean), so two steps are within 2; a crop off by one column is ~40 away.
    pixels = np.random.default_rng(1).integers(0, 256, (128, 300, 3), dtype=np.uint8)
    crop = center_crop_arr(Image.fromarray(pixels), 32)
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    halved = pixels.astype(np.float64)
    for _ in range(2):
        halved = halved.reshape(halved.shape[0] // 2, 2, halved.shape[1] // 2, 2, 3).mean((1, 3))
    assert np.abs(crop - halved[:, 21:53]).max() <= 2.0
    assert np.abs(crop - halved[:, 22:54]).mean() > 20.0
    # the direct bicubic resize + centre crop that torchvision users often write is not the same image
    naive = np.asarray(
        TF.center_crop(TF.resize(Image.fromarray(pixels), 32, TF.InterpolationMode.BICUBIC), 32)
    )
    assert np.abs(crop.astype(np.float64) - naive).mean() > 5.0


def test_center_crop_bicubic_step_on_an_odd_size():
    # 100x70: 70 >= 64 -> BOX 50x35; then BICUBIC to round(50 * 32/35) = 46 x 32; crop columns 7..38
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (70, 100, 3), dtype=np.uint8))
    expected = np.asarray(image.resize((50, 35), Image.BOX).resize((46, 32), Image.BICUBIC))[:, 7:39]
    np.testing.assert_array_equal(center_crop_arr(image, 32), expected)


def test_folder_batches_labels_and_skipped_file(tmp_path):
    make_folder(tmp_path / "images")
    data = ImageFolderDataModule(str(tmp_path / "images"), image_size=32, batch_size=4, val_fraction=0.2,
                                 num_workers=0)  # fmt: skip
    assert data.class_names == ["cat", "dog", "fox"] and data.num_classes == 3 and data.channels == 3
    data.setup()
    assert len(data.train_set) + len(data.val_set) == 22 and len(data.val_set) == 4
    train_files = {path for path, _ in data.train_set.samples}
    assert not train_files & {path for path, _ in data.val_set.samples}
    for path, label in data.train_set.samples + data.val_set.samples:
        assert Path(path).parent.name == data.class_names[label]
    with pytest.warns(SkippedImageWarning, match="broken.png"):
        everything = [data.train_set[i] for i in range(len(data.train_set))]
        everything += [data.val_set[i] for i in range(len(data.val_set))]
    assert data.skipped == 1 and data.skipped_files[0].endswith("dog/broken.png")
    images = torch.stack([image for image, _ in everything])
    assert images.shape == (22, 3, 32, 32) and images.min() >= -1.0 and images.max() <= 1.0
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.long


def test_skipped_count_includes_dataloader_workers(tmp_path):
    make_folder(tmp_path / "images", per_class=2)
    data = ImageFolderDataModule(str(tmp_path / "images"), image_size=16, batch_size=7, val_fraction=0.0,
                                 num_workers=1)  # fmt: skip
    data.setup()
    batches = list(data.train_dataloader())
    assert sum(len(labels) for _, labels in batches) == 7  # 7 files, one broken: its neighbour stands in
    assert data.skipped == 1


def test_flip_mirrors_half_the_time(tmp_path):
    make_folder(tmp_path / "images", per_class=1, corrupt=False)
    data = ImageFolderDataModule(str(tmp_path / "images"), image_size=32, batch_size=1, val_fraction=0.0)
    data.setup()
    plain = data.train_set.load(0)
    torch.manual_seed(0)
    draws = [data.train_set[0][0] for _ in range(20)]
    flipped = sum(torch.equal(draw, plain.flip(-1)) for draw in draws)
    assert sum(torch.equal(draw, plain) for draw in draws) + flipped == 20 and 3 <= flipped <= 17


def test_separate_val_folder(tmp_path):
    make_folder(tmp_path / "train", corrupt=False)
    make_folder(tmp_path / "val", per_class=2, corrupt=False)
    data = ImageFolderDataModule(
        str(tmp_path / "train"), val_root=str(tmp_path / "val"), image_size=16, batch_size=4
    )
    data.setup()
    assert len(data.train_set) == 21 and len(data.val_set) == 6
    make_folder(tmp_path / "other", classes=("ant", "bee", "cow"), corrupt=False)
    with pytest.raises(ValueError, match="same class folders"):
        ImageFolderDataModule(str(tmp_path / "train"), val_root=str(tmp_path / "other")).setup()


@pytest.mark.parametrize("problem", ["empty", "batch"])
def test_empty_folder_and_oversized_batch_are_one_clear_error(problem, tmp_path):
    if problem == "empty":
        (tmp_path / "images" / "cat").mkdir(parents=True)
        (tmp_path / "images" / "cat" / "readme.txt").write_text("no images here")
        error, match = FileNotFoundError, "has no images"
    else:
        make_folder(tmp_path / "images", per_class=2, corrupt=False)
        error, match = ValueError, "at most 6"
    data = ImageFolderDataModule(str(tmp_path / "images"), batch_size=50, val_fraction=0.0)
    with pytest.raises(error, match=match) as caught:
        data.setup()
    assert "\n" not in str(caught.value)


def test_cifar10_without_files_says_where_to_put_them(tmp_path):
    data = CIFAR10DataModule(root=str(tmp_path / "cifar"), download=False)
    with pytest.raises(FileNotFoundError) as caught:
        data.setup()
    message = str(caught.value)
    assert "\n" not in message
    assert str(tmp_path / "cifar" / "cifar-10-batches-py") in message and "download: true" in message


@pytest.mark.parametrize("piece, recipe", [("digits", "dit"), ("cifar10", "dit"), ("imagefolder", "dit"),
                                           ("imagenet_latents", "dit_imagenet256")])  # fmt: skip
def test_data_config_pieces_compose_with_a_recipe(piece, recipe, monkeypatch, capsys):
    import yaml

    from ditlab.cli import build_cli

    # cli.py's data base class is DigitsDataModule; every LightningDataModule has to be accepted
    config = ROOT / "configs" / "data" / f"{piece}.yaml"
    with pytest.raises(SystemExit):
        build_cli(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / f"{recipe}.yaml"),
                "--config",
                str(config),
                "--print_config",
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = yaml.safe_load(config.read_text())["data"]
    assert printed["data"]["class_path"] == expected["class_path"]
    for key, value in expected["init_args"].items():
        assert printed["data"]["init_args"][key] == value
