"""``ditlab encode --text_encoder``: caption features pre-extracted next to the pixels, read back as ``TextFeatures``.

A tiny deterministic word-hashing encoder registered for these tests stands in for the scene CLIP / T5 (it counts
its calls, so a run that trains on the shards can be shown never to encode a caption). The stored features must be
the encoder's own output bitwise, the empty caption's features must come back as every batch's ``null``, a crashed
encode resumes without touching finished shards, and a network naming another encoder is refused in one line.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ditlab.cli import main
from ditlab.data import shards, text_shards
from ditlab.data.latents import LatentDataModule
from ditlab.data.scenes import DigitScenes
from ditlab.diffusion.config import SamplingConfig
from ditlab.methods.base import DiffusionModule
from ditlab.models.config import DiTConfig
from ditlab.models.text.features import TextEncoder, TextFeatures
from ditlab.models.text.registry import TEXT_ENCODERS, build_text_encoder, register_text_encoder

torch.set_num_threads(1)

FAKE, LENGTH, DIM, POOLED, VOCAB = "test-words", 20, 6, 5, 97
CALLS = {"captions": 0}


class HashedWords(TextEncoder):
    """A start token, then each word's crc32 picks a row of a seeded table (as CLIP/T5 put BOS/EOS around the words,
    the empty caption is not all padding); pooled is a seeded projection of the token mean."""

    name, dim, pooled_dim, max_length = FAKE, DIM, POOLED, LENGTH

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(VOCAB, DIM, generator=generator))
        self.register_buffer("projection", torch.randn(DIM, POOLED, generator=generator))

    def encode(self, captions: list[str]) -> TextFeatures:
        CALLS["captions"] += sum(1 for caption in captions if caption)
        ids = torch.zeros(len(captions), LENGTH, dtype=torch.long)
        mask = torch.zeros(len(captions), LENGTH, dtype=torch.bool)
        for row, caption in enumerate(captions):
            words = ["<start>", *caption.split()][:LENGTH]
            ids[row, : len(words)] = torch.tensor([zlib.crc32(w.encode()) % VOCAB for w in words], dtype=torch.long)
            mask[row, : len(words)] = True
        tokens = self.table[ids] * mask[..., None]
        mean = tokens.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return TextFeatures(tokens, mean @ self.projection, mask)


@pytest.fixture(autouse=True)
def fake_encoder():
    register_text_encoder(FAKE)(HashedWords)
    yield
    TEXT_ENCODERS.pop(FAKE, None)


ARGS = ["--vae", "none", "--image-size", "32", "--text_encoder", FAKE, "--shard-size", "4", "--batch-size", "3",
        "--num-workers", "0", "--no-progress"]  # fmt: skip
SOURCE, COUNT = "scenes:validation:10", 10


def encode(out: Path, *extra: str, source: str = SOURCE) -> int:
    return main(["encode", source, *ARGS, *extra, "--out", str(out)])


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.safetensors"))


def stored(folder: Path) -> dict[str, torch.Tensor]:
    parts = [load_file(str(path)) for path in shard_files(folder)]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


@pytest.fixture
def clean(tmp_path) -> Path:
    out = tmp_path / "clean"
    assert encode(out) == 0
    return out


def test_stored_features_are_the_encoders_own_bitwise(clean):
    meta = shards.read_meta(clean)
    assert meta["mode"] == "pixels" and meta["vae"] is None and meta["latent_shape"] == [3, 32, 32]
    assert meta["source"] == "digit-scenes-v1:validation:10" and meta["num_shards"] == 3
    assert meta["text"] == {"encoder": FAKE, "encoder_options": {}, "length": LENGTH, "dim": DIM, "pooled_dim": POOLED}
    rows = stored(clean)
    scenes = DigitScenes("validation", 32, COUNT)
    assert rows["indices"].tolist() == list(range(COUNT))
    direct = build_text_encoder(FAKE)(scenes.captions(range(COUNT)))  # all ten at once, not the encode's batches of 3
    assert torch.equal(rows["text_tokens"], direct.tokens) and torch.equal(rows["text_pooled"], direct.pooled)
    assert rows["text_mask"].dtype == torch.uint8 and torch.equal(rows["text_mask"].bool(), direct.mask)
    assert torch.equal(rows["pixels"], scenes.images(range(COUNT)))
    assert rows["labels"].tolist() == [attributes.digits[0] for attributes in scenes.attributes(range(COUNT))]
    null = text_shards.read_null(clean, meta["text"])
    assert torch.equal(null.tokens, direct.null.tokens) and torch.equal(null.pooled, direct.null.pooled)
    assert torch.equal(null.mask, direct.null.mask) and null.mask.sum() == 1  # "": the start token alone


def test_datamodule_batches_are_text_features_with_the_empty_caption(clean):
    CALLS["captions"] = 0
    data = LatentDataModule(str(clean), batch_size=4, num_workers=0, val_fraction=0.4)
    data.setup()
    assert (data.channels, data.scale, data.num_classes) == (3, 1.0, 10) and not data.train_set.flip
    images, labels, text = next(iter(data.val_dataloader()))  # validation: rows in stored order, unflipped
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert isinstance(text, TextFeatures) and text.tokens.shape == (4, LENGTH, DIM) and text.pooled.shape == (4, POOLED)
    assert text.mask.dtype == torch.bool and text.tokens.dtype == torch.float32
    indices = data.val_set.indices[data.val_set.rows[:4]].tolist()
    scenes = DigitScenes("validation", 32, COUNT)
    direct = build_text_encoder(FAKE)(scenes.captions(indices))
    assert torch.equal(text.tokens, direct.tokens) and torch.equal(text.mask, direct.mask)
    assert torch.equal(images, scenes.images(indices))
    assert text.null.tokens.shape == (1, LENGTH, DIM) and torch.equal(text.null.tokens, direct.null.tokens)
    dropped = text.where(torch.tensor([True, False, False, False]))  # caption drop-out works on the batch as is
    assert torch.equal(dropped.tokens[0], direct.null.tokens[0]) and torch.equal(dropped.tokens[1], direct.tokens[1])
    train = next(iter(data.train_dataloader()))
    assert isinstance(train[2], TextFeatures) and len(train[2]) == 4 and train[2].null is not None
    assert CALLS["captions"] == 4  # only the direct encoding above: reading the shards encodes nothing


def test_crash_mid_encode_then_resume_keeps_finished_shards(clean, tmp_path, monkeypatch, capsys):
    out, real_save, saved = tmp_path / "resumed", shards.save_shard, []

    def crash_on_third(path, tensors, metadata):
        if len(saved) == 2:
            path.with_name(f".{path.name}.tmp-99999").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        saved.append(path.name)
        real_save(path, tensors, metadata)

    monkeypatch.setattr(shards, "save_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        encode(out)
    finished = {path.name: path.stat().st_mtime_ns for path in shard_files(out)}
    assert sorted(finished) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    monkeypatch.setattr(shards, "save_shard", real_save)
    capsys.readouterr()
    assert encode(out) == 0
    assert "wrote 1 shards, 2 were already done" in capsys.readouterr().out
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished
    assert not list(out.glob("*.tmp-*"))
    for path in shard_files(clean):
        mine, theirs = load_file(str(out / path.name)), load_file(str(path))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(load_file(str(out / text_shards.NULL_FILE))["tokens"],
                       load_file(str(clean / text_shards.NULL_FILE))["tokens"])  # fmt: skip


def one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("ditlab: error:"), error
    return error[0]


def test_another_encoder_or_flips_or_no_captions_are_refused_in_one_line(clean, tmp_path, monkeypatch, capsys):
    other = one_line_error(["encode", SOURCE, *ARGS, "--text_encoder_options", '{"seed": 1}', "--out", str(clean)],
                           capsys)  # fmt: skip
    assert "--text_encoder/--text_encoder_options" in other and "'seed': 1" in other
    stale = tmp_path / "stale"
    assert encode(stale) == 0
    with monkeypatch.context() as patch:  # the same name and options, other weights behind them
        patch.setitem(TEXT_ENCODERS, FAKE, lambda: HashedWords(seed=3))
        message = one_line_error(["encode", SOURCE, *ARGS, "--out", str(stale)], capsys)
    assert "empty-caption features" in message and "weights behind the name changed" in message
    assert "contradicts captions" in one_line_error(["encode", SOURCE, *ARGS, "--flip", "--out", str(tmp_path / "f")],
                                                    capsys)  # fmt: skip
    assert "has no captions" in one_line_error(["encode", "digits", *ARGS, "--out", str(tmp_path / "d")], capsys)
    assert "32 or 64" in one_line_error(["encode", SOURCE, *ARGS, "--image-size", "48", "--out", str(tmp_path / "s")],
                                        capsys)  # fmt: skip
    with pytest.raises(ValueError, match="holds captions.*data.flip false"):
        LatentDataModule(str(clean), flip=True, batch_size=2).setup()


def text_network(encoder: str = FAKE, **options) -> DiTConfig:
    condition = {"encoder": encoder, "text_dim": DIM, "pooled_dim": POOLED, "projection": "linear", **options}
    return DiTConfig(input_size=32, patch_size=8, in_channels=3, hidden_size=16, depth=1, num_heads=2, block="mmdit",
                     condition="text", condition_options=condition)  # fmt: skip


def test_a_network_naming_another_encoder_or_width_is_refused(clean):
    pytest.importorskip("ditlab.models.blocks.mmdit")  # registers the "mmdit" block kind
    data = LatentDataModule(str(clean), batch_size=2, num_workers=0)
    data.setup()
    data.check_network(text_network())  # the encoder that wrote the shards: accepted
    data.check_network(DiTConfig(input_size=32, patch_size=8, in_channels=3, hidden_size=16, depth=1, num_heads=2,
                                 num_classes=10))  # a class-conditional network ignores the text  # fmt: skip
    with pytest.raises(ValueError, match="condition_options.encoder is 'scene-clip' but .* encoded by 'test-words'"):
        data.check_network(text_network("scene-clip"))
    with pytest.raises(ValueError, match=r"encoded by 'test-words'; set condition_options"):
        data.check_network(text_network(encoder_options={"seed": 2}))
    with pytest.raises(ValueError, match="text_dim=6, pooled_dim=7 but .* holds 6 and 5"):
        data.check_network(text_network(pooled_dim=7))
    module = DiffusionModule(network=text_network("scene-clip"), lr=1e-3)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match="'scene-clip' but"):
        trainer.fit(module, datamodule=LatentDataModule(str(clean), batch_size=2, num_workers=0))


def test_a_text_network_trains_on_the_shards_without_running_its_encoder(clean, tmp_path):
    pytest.importorskip("ditlab.models.blocks.mmdit")
    L.seed_everything(0)
    CALLS["captions"] = 0
    data = LatentDataModule(str(clean), batch_size=4, num_workers=0, val_fraction=0.2)
    module = DiffusionModule(network=text_network(), sampling=SamplingConfig(sampler="ddim", steps=2), lr=1e-3)
    before = [p.detach().clone() for p in module.network.parameters()]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, module.network.parameters()))
    assert CALLS["captions"] == 0  # every condition came from the shards


def test_image_folder_with_caption_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    captions = {}
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(2):
            path = tmp_path / "images" / label / f"{index}.png"
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
            captions[str(path)] = f"a {label} number {index}"
            path.with_suffix(".txt").write_text(captions[str(path)] + "\n")
    out = tmp_path / "folder"
    argv = ["encode", str(tmp_path / "images"), *ARGS, "--image-size", "16", "--out", str(out)]
    assert main(argv) == 0
    rows = stored(out)
    direct = build_text_encoder(FAKE)(list(captions.values()))  # sorted (class, path) order, as the encoder reads
    assert torch.equal(rows["text_tokens"], direct.tokens) and rows["pixels"].shape == (4, 3, 16, 16)
    (tmp_path / "images" / "dog" / "1.txt").unlink()
    message = one_line_error([*argv[:-1], str(tmp_path / "missing")], capsys)
    assert "1.png has no caption file 1.txt" in message
