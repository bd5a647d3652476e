"""``ditlab encode`` and the latent datamodule, with a tiny random ``AutoencoderKL`` (8x down-sampling).

Resume after a crash or a kill, disjoint shards per rank, refusal of another VAE or latent size, posterior
sampling and flips on read, and a tiny DiT trained on the shards whose samples decode to 64x64 images.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ditlab.callbacks.samples import SampleGrid
from ditlab.cli import main
from ditlab.data import shards
from ditlab.data.images import SkippedImageWarning, center_crop_arr, scan_image_folder, to_signed
from ditlab.data.latents import LatentDataModule
from ditlab.data.vae import load_vae
from ditlab.diffusion.config import SamplingConfig
from ditlab.methods.base import DiffusionModule
from ditlab.models.config import DiTConfig

ROOT = Path(__file__).resolve().parents[2]


def build_vae(folder: Path, seed: int = 0, blocks: tuple[int, ...] = (8, 16, 16, 16)) -> str:
    """A random ``AutoencoderKL`` saved like a downloaded one; 4 blocks down-sample 8x."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                        up_block_types=("UpDecoderBlock2D",) * len(blocks), norm_num_groups=8,
                        layers_per_block=1, latent_channels=4)  # fmt: skip
    vae.save_pretrained(folder)
    return str(folder)


def make_folder(root: Path) -> Path:
    """3 classes x 7 random 64x64-ish PNGs, plus the undecodable ``dog/broken.png``."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "fox"):
        (root / name).mkdir(parents=True)
        for index in range(7):
            pixels = rng.integers(0, 256, (64, 64 + 8 * index, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated" * 10)
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """A tiny VAE, an image folder, and a clean single-process encode of it (shards of 5, with flips)."""
    root = tmp_path_factory.mktemp("latents")
    work = {"vae": build_vae(root / "vae"), "images": str(make_folder(root / "images"))}
    work["clean"] = root / "clean"
    work["args"] = ["encode", work["images"], "--vae", work["vae"], "--image-size", "64", "--shard-size", "5",
                    "--batch-size", "3", "--flip", "--num-workers", "0"]  # fmt: skip
    with pytest.warns(SkippedImageWarning):
        assert main([*work["args"], "--out", str(work["clean"]), "--no-progress"]) == 0
    _, samples = scan_image_folder(work["images"])
    work["samples"] = samples
    work["broken"] = next(i for i, (path, _) in enumerate(samples) if path.endswith("broken.png"))
    return work


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.safetensors"))


def assert_same_shards(folder: Path, reference: Path) -> None:
    assert [p.name for p in shard_files(folder)] == [p.name for p in shard_files(reference)]
    for path in shard_files(folder):
        mine, theirs = load_file(path), load_file(reference / path.name)
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), f"{path.name}:{name} differs from the clean run"


def test_clean_encode_stores_moments_of_the_centre_crop(work):
    meta = shards.read_meta(work["clean"])
    assert meta["latent_shape"] == [4, 8, 8] and meta["num_shards"] == 5 and meta["num_images"] == 22
    assert meta["class_names"] == ["cat", "dog", "fox"] and meta["scaling_factor"] == 0.18215
    indices = torch.cat([load_file(p)["indices"] for p in shard_files(work["clean"])])
    assert sorted(indices.tolist()) == [i for i in range(22) if i != work["broken"]]
    first = load_file(shard_files(work["clean"])[0])
    assert first["mean"].shape == first["flip_std"].shape == (5, 4, 8, 8)
    images = torch.stack([to_signed(center_crop_arr(Image.open(work["samples"][i][0]).convert("RGB"), 64))
                          for i in first["indices"].tolist()])  # fmt: skip
    with torch.no_grad():
        vae = load_vae(work["vae"])
        posterior, flipped = vae.encode(images).latent_dist, vae.encode(images.flip(-1)).latent_dist
    torch.testing.assert_close(first["mean"], posterior.mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(first["std"], posterior.std, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(first["flip_mean"], flipped.mean, atol=1e-5, rtol=1e-4)
    assert first["labels"].tolist() == [work["samples"][i][1] for i in first["indices"].tolist()]


def test_crash_mid_shard_then_resume_gives_the_clean_shards(work, tmp_path, monkeypatch, capsys):
    out, real_save, saved = tmp_path / "shards", shards.save_shard, []

    def crash_on_third(path, tensors, metadata):
        if len(saved) == 2:  # killed while writing shard 2: a half-written temp file is left behind
            path.with_name(f".{path.name}.tmp-99999").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        saved.append(path.name)
        real_save(path, tensors, metadata)

    monkeypatch.setattr(shards, "save_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        main([*work["args"], "--out", str(out)])
    assert [p.name for p in shard_files(out)] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert list(out.glob("*.tmp-*"))
    monkeypatch.setattr(shards, "save_shard", real_save)
    capsys.readouterr()
    with pytest.warns(SkippedImageWarning, match="broken.png"):  # shard 2 holds the broken file
        assert main([*work["args"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 shards, 2 were already done; 1 unreadable images skipped" in printed
    assert "broken.png" in printed
    assert not list(out.glob("*.tmp-*"))
    assert_same_shards(out, work["clean"])
    assert shards.shard_header(shards.shard_path(out, 2))["skipped"] == [work["broken"]]


@pytest.mark.slow
def test_killed_encoder_process_resumes_without_duplicates_or_gaps(work, tmp_path):
    args = ["encode", "digits", "--vae", work["vae"], "--image-size", "32", "--shard-size", "60",
            "--batch-size", "20", "--num-workers", "0", "--no-progress"]  # fmt: skip
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    process = subprocess.Popen([sys.executable, "-m", "ditlab", *args, "--out", str(killed)],
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while len(shard_files(killed)) < 3:
            assert process.poll() is None, "the encoder stopped before it could be killed"
            assert time.monotonic() < deadline, "the encoder wrote no shards within the timeout"
            time.sleep(0.005)
    finally:
        process.kill()
        process.wait(timeout=60)
    assert 3 <= len(shard_files(killed)) < 30  # 1,797 digits in 30 shards: killed midway
    assert main([*args, "--out", str(killed)]) == 0
    assert main([*args, "--out", str(clean)]) == 0
    assert_same_shards(killed, clean)
    indices = torch.cat([load_file(path)["indices"] for path in shard_files(killed)])
    assert torch.equal(indices, torch.arange(1797))


def test_ranks_write_disjoint_shards_that_match_one_process(work, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ranks"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main([*work["args"], "--out", str(out), "--no-progress"]) == 0
    assert [p.name for p in shard_files(out)] == ["shard-00001.safetensors", "shard-00003.safetensors"]
    assert "not complete" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match=r"3 of 5 shards missing \(0, 2, 4\)"):
        LatentDataModule(str(out), flip=False).setup()
    assert main([*work["args"], "--out", str(out), "--no-progress", "--rank", "0"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 shards" in printed and printed.strip().endswith(": complete")
    assert_same_shards(out, work["clean"])


def refused(args: list[str], capsys) -> str:
    """The one line ``ditlab`` prints when it refuses ``args`` (exit code 2)."""
    capsys.readouterr()
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("ditlab: error:")
    return error[0]


def test_another_vae_or_latent_size_is_refused_naming_both(work, tmp_path, capsys):
    before = {path.name: path.stat().st_mtime_ns for path in work["clean"].iterdir()}
    reweighted = build_vae(tmp_path / "reweighted", seed=1)  # same config, other weights (ema vs mse)
    message = refused([*work["args"], "--out", str(work["clean"]), "--vae", reweighted], capsys)
    assert str(Path(work["vae"]).resolve()) in message and str(Path(reweighted).resolve()) in message
    four_x = build_vae(tmp_path / "four_x", blocks=(8, 16, 16))  # 4x down-sampling: 16x16 latents
    message = refused([*work["args"], "--out", str(work["clean"]), "--vae", four_x], capsys)
    assert "latents 4x8x8" in message and "latents 4x16x16" in message
    assert str(Path(four_x).resolve()) in message
    message = refused([*work["args"], "--out", str(work["clean"]), "--shard-size", "4"], capsys)
    assert "shard_size=5" in message and "shard_size=4" in message
    assert {path.name: path.stat().st_mtime_ns for path in work["clean"].iterdir()} == before
    with pytest.raises(ValueError, match=f"{Path(reweighted).resolve()}"):
        LatentDataModule(str(work["clean"]), vae=reweighted).setup()
    with pytest.raises(ValueError, match="4x8x8 latents.*latent_size=16"):
        LatentDataModule(str(work["clean"]), latent_size=16).setup()


def test_datamodule_scales_resamples_and_flips_on_read(work):
    data = LatentDataModule(str(work["clean"]), vae=work["vae"], latent_size=8, sample_posterior=False, flip=False,
                            batch_size=4)  # fmt: skip
    data.setup()
    assert (data.num_classes, data.channels, data.scale, data.skipped) == (3, 4, 0.18215, 1)
    assert data.skipped_files[0].endswith("broken.png") and len(data.train_set) == 21
    assert not data.val_dataloader()  # val_fraction 0 and no val_root: no validation
    first = load_file(shard_files(work["clean"])[0])
    latents, label = data.train_set[0]
    assert torch.equal(latents, first["mean"][0] * 0.18215) and label == first["labels"][0]

    torch.manual_seed(0)
    noisy = LatentDataModule(str(work["clean"]), latent_scale=0.5, flip=False, batch_size=4)
    noisy.setup()
    draws = torch.stack([noisy.train_set[0][0] / 0.5 for _ in range(200)])  # (200, 4, 8, 8)
    z = (draws - first["mean"][0]) / first["std"][0]  # a fresh posterior sample on every read
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03

    flips = LatentDataModule(str(work["clean"]), sample_posterior=False, batch_size=4)
    flips.setup()
    draws = [flips.train_set[0][0] for _ in range(100)]
    mirrored = sum(torch.equal(draw, first["flip_mean"][0] * 0.18215) for draw in draws)
    assert sum(torch.equal(draw, first["mean"][0] * 0.18215) for draw in draws) + mirrored == 100
    assert 30 <= mirrored <= 70

    split = LatentDataModule(str(work["clean"]), val_fraction=0.25, batch_size=4)
    split.setup()
    assert len(split.train_set) == 16 and len(split.val_set) == 5
    assert not set(split.train_set.rows.tolist()) & set(split.val_set.rows.tolist())
    means = torch.cat([load_file(path)["mean"] for path in shard_files(work["clean"])])
    row = int(split.val_set.rows[0])  # validation reads the unflipped mean: a deterministic val loss
    assert torch.equal(split.val_set[0][0], means[row] * 0.18215)


def test_datamodule_bad_input_is_one_clear_error(work, tmp_path):
    with pytest.raises(ValueError, match="at most 21"):
        LatentDataModule(str(work["clean"]), flip=False, batch_size=64).setup()
    with pytest.raises(FileNotFoundError, match="no meta.json.*ditlab encode"):
        LatentDataModule(str(tmp_path)).setup()
    sampled = tmp_path / "sampled"
    assert main(["encode", work["images"], "--vae", work["vae"], "--image-size", "64", "--mode", "sample",
                 "--shard-size", "11", "--num-workers", "0", "--no-progress", "--out", str(sampled)]) == 0  # fmt: skip
    with pytest.raises(ValueError, match="no flipped latents"):
        LatentDataModule(str(sampled), sample_posterior=False).setup()
    with pytest.raises(ValueError, match="sample_posterior false"):
        LatentDataModule(str(sampled), flip=False).setup()
    fixed = LatentDataModule(str(sampled), flip=False, sample_posterior=False, batch_size=2)
    fixed.setup()
    assert torch.equal(fixed.train_set[3][0], fixed.train_set[3][0])  # one stored sample, read as is


def test_tiny_dit_trains_on_latents_and_decodes_a_sample_grid(work, tmp_path):
    L.seed_everything(0)
    data = LatentDataModule(str(work["clean"]), vae=work["vae"], latent_size=8, batch_size=4, val_fraction=0.2,
                            num_workers=0)  # fmt: skip
    network = DiTConfig(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3
    )
    module = DiffusionModule(network=network, sampling=SamplingConfig(sampler="ddim", steps=2), lr=1e-3,
                             ema_decay=0.9, vae=work["vae"], latent_scale=data.scale)  # fmt: skip
    before = [p.detach().clone() for p in module.network.parameters()]
    grid = SampleGrid(every_n_steps=0, per_class=2)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[grid])  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, module.network.parameters()))
    images = module.sample(torch.tensor([0, 1, 2]), seed=0)
    assert images.shape == (3, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert Image.open(grid.last_path).size == (2 * 65 + 1, 3 * 65 + 1)  # 3 classes x 2 decoded 64x64 images


def test_imagenet_recipe_names_the_vae_once(monkeypatch, capsys):
    import yaml

    from ditlab.cli import build_cli

    # cli.py's data base class is DigitsDataModule; every LightningDataModule has to be accepted
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(ROOT / "configs" / "dit_imagenet256.yaml"), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    model, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
    assert model["vae"] == data["vae"] == "stabilityai/sd-vae-ft-ema"
    assert model["latent_scale"] == data["latent_scale"] == 0.18215
    network = DiTConfig(**model["network"])  # the XL/2 preset fills the sizes the config leaves out
    assert network.input_size == data["latent_size"] == 32 and network.depth == 28
    assert data["batch_size"] * trainer["devices"] == 256 and trainer["strategy"] == "ddp"
    assert (model["lr"], model["weight_decay"], model["ema_decay"]) == (1e-4, 0.0, 0.9999)
    assert (trainer["max_steps"], trainer["precision"]) == (400000, "bf16-mixed")
    assert (model["sampling"]["cfg_scale"], model["network"]["learn_sigma"]) == (1.5, True)


def test_encode_without_vae_weights_is_the_load_vae_message(tmp_path, capsys):
    assert main(["encode", "digits", "--vae", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "has no config.json" in error[0] and "huggingface-cli download" in error[0]


def test_copied_folder_with_a_stale_shard_is_refused(work, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(work["clean"], copy)
    other = tmp_path / "other"
    assert main(["encode", work["images"], "--vae", work["vae"], "--image-size", "64", "--shard-size", "5",
                 "--num-workers", "0", "--no-progress", "--out", str(other)]) == 0  # fmt: skip
    shutil.copy(shards.shard_path(other, 1), shards.shard_path(copy, 1))  # from a run without --flip
    with pytest.raises(ValueError, match="shard-00001.safetensors were written by another encode run"):
        LatentDataModule(str(copy), flip=False).setup()
