import hashlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ditlab.data.scene_grammar import parse_caption, relation_of
from ditlab.data.scenes import (
    COLOURS,
    DIGIT_WORDS,
    SCENES_NAME,
    DigitScenes,
    SceneAttributes,
    ScenesDataModule,
    _Scene,
    glyph_split,
)

ROOT = Path(__file__).resolve().parents[2]
# Pinned: a change here is a change of the generator, which must bump SCENES_VERSION (and so SCENES_NAME).
GOLDEN = {
    "train": ("e527f348816a5039", "a large purple 2 above a small orange 2 on a black background"),
    "validation": ("7fb7599b1a081d55", "a small orange 3 right of a small green 8 on a brown background"),
    "test": ("af8dfa7b9392333f", "a large yellow 9 right of a small cyan 9 on a navy background"),
}


def fingerprint(split: str) -> tuple[str, str]:
    """A hash of the first 8 scenes' uint8 pixels and the first caption."""
    ds = DigitScenes(split)
    images = ds.images(range(8))
    digest = hashlib.sha256(((images + 1) * 127.5).round().byte().numpy().tobytes()).hexdigest()[:16]
    return digest, ds.captions([0])[0]


def test_name_is_versioned():
    assert SCENES_NAME == "digit-scenes-v1"


def test_same_index_same_scene_in_this_run_another_process_and_the_pinned_run():
    script = ("import hashlib, json\nfrom ditlab.data.scenes import DigitScenes\n" + inspect.getsource(fingerprint)
              + "print(json.dumps({s: fingerprint(s) for s in ('train', 'validation', 'test')}))")
    there = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    there = {split: tuple(value) for split, value in json.loads(there.stdout).items()}
    for split in GOLDEN:
        here = fingerprint(split)
        assert here == there[split] == GOLDEN[split]
        assert here == fingerprint(split)  # and again in this process


def test_items_have_the_contract_types_and_ranges():
    item = DigitScenes("validation")[5]
    image, attributes = item["image"], item["attributes"]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -1.0 <= image.min() and image.max() <= 1.0
    assert isinstance(attributes, SceneAttributes) and item["label"] == attributes.digits[0]
    assert item["caption"] == attributes.caption()
    assert all(0 <= x <= 1 and 0 <= y <= 1 for x, y in attributes.positions)
    assert set(attributes.colours) <= set(COLOURS) and {str(d) for d in attributes.digits} <= set(DIGIT_WORDS)


def test_64_pixels_is_the_same_scene_at_twice_the_scale():
    small, large = DigitScenes("train", 32), DigitScenes("train", 64)
    assert small.captions(range(20)) == large.captions(range(20))
    down = torch.nn.functional.avg_pool2d(large[3]["image"][None], 2)[0]
    assert (down - small[3]["image"]).abs().mean() < 0.05


def test_glyph_split_is_disjoint_complete_stratified_and_used():
    split = glyph_split()
    train, validation, test = (set(split[name].tolist()) for name in ("train", "validation", "test"))
    assert not train & validation and not train & test and not validation & test
    assert len(train | validation | test) == 1797 and (len(validation), len(test)) == (180, 180)
    for name in ("validation", "test"):
        used = {glyph for index in range(300) for glyph in _Scene(name, index).glyphs}
        assert used <= set(split[name].tolist())
    assert DigitScenes("train").captions(range(50)) != DigitScenes("validation").captions(range(50))


def test_captions_parse_back_to_the_attributes_and_relations_match_positions():
    ds = DigitScenes("train")
    for attributes in ds.attributes(range(500)):
        assert parse_caption(attributes.caption()) == attributes.described()
        if attributes.count == 2:
            assert relation_of(*attributes.positions) == attributes.relation
        else:
            assert attributes.relation is None
    counts = np.bincount([a.count for a in ds.attributes(range(2000))], minlength=4)[1:] / 2000
    assert np.allclose(counts, [0.25, 0.5, 0.25], atol=0.04)


@pytest.mark.parametrize("caption", ["a red 3 on a grey background", "a small red 3 next to a large blue 7 on a "
                                     "grey background", "a small pink 3 on a grey background"])  # fmt: skip
def test_off_grammar_captions_are_one_line_errors(caption):
    with pytest.raises(ValueError, match="not in the digit-scenes grammar"):
        parse_caption(caption)


def test_datamodule_yields_class_batches_and_optionally_captions():
    module = ScenesDataModule(batch_size=8, train_length=64, val_length=16, shuffle_seed=0)
    module.setup()
    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.long
    with_captions = ScenesDataModule(batch_size=8, train_length=64, val_length=16, shuffle_seed=0, captions=True)
    with_captions.setup()
    same_images, same_labels, captions = next(iter(with_captions.train_dataloader()))
    assert torch.equal(images, same_images) and torch.equal(labels, same_labels)
    assert [parse_caption(c).digits[0] for c in captions] == labels.tolist()
    assert len(next(iter(module.val_dataloader()))[0]) == 8


@pytest.mark.parametrize("kwargs, message", [({"image_size": 48}, "image_size"), ({"batch_size": 0}, "batch_size"),
                                             ({"train_length": 0}, "train_length")])  # fmt: skip
def test_bad_options_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScenesDataModule(**kwargs)


def test_bad_dataset_arguments_are_refused():
    with pytest.raises(ValueError, match="split"):
        DigitScenes("val")
    with pytest.raises(ValueError, match="size"):
        DigitScenes(size=16)
    with pytest.raises(IndexError):
        DigitScenes("test", length=4)[4]


def test_class_conditional_config_trains_on_scenes(tiny_args):
    """``configs/dit.yaml`` + ``configs/data/scenes.yaml`` (and 3 input channels) builds and takes a finite step."""
    from ditlab.cli import build_cli

    cli = build_cli([*tiny_args, "--config", str(ROOT / "configs" / "data" / "scenes.yaml"),
                     "--model.init_args.network.in_channels", "3", "--model.init_args.network.patch_size", "4",
                     "--data.init_args.train_length", "64", "--data.init_args.val_length", "16"], run=False)  # fmt: skip
    assert isinstance(cli.datamodule, ScenesDataModule) and cli.datamodule.image_size == 32
    cli.datamodule.setup("fit")
    images, labels = next(iter(cli.datamodule.train_dataloader()))
    loss = cli.model.training_step((images, labels), 0)
    assert images.shape[1:] == (3, 32, 32) and torch.isfinite(loss)
