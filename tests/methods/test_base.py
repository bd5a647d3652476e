"""DiffusionModule: EMA, optimiser schedule, losses that fall, checkpoints that rebuild and sample."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from ditlab.checkpoint import bundle_from_checkpoint, network_from_checkpoint, read_checkpoint
from ditlab.cli import main
from ditlab.data.digits import DigitsDataModule
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.base import DiffusionModule
from ditlab.models.config import DiTConfig

TINY_NET = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def test_ema_update_follows_the_formula_and_decay_zero_copies(perturb):
    module = DiffusionModule(network=TINY_NET, ema_decay=0.9)
    before = copy.deepcopy(module.ema.state_dict())
    perturb(module.network, frozen_too=True)
    module.update_ema()
    for name, value in module.ema.state_dict().items():
        expected = 0.9 * before[name] + 0.1 * module.network.state_dict()[name]
        torch.testing.assert_close(value, expected)
    copier = DiffusionModule(network=TINY_NET, ema_decay=0.0)
    perturb(copier.network, frozen_too=True)
    copier.update_ema()
    for name, value in copier.ema.state_dict().items():
        assert torch.equal(value, copier.network.state_dict()[name])


def test_warmup_is_linear_then_constant():
    module = DiffusionModule(network=TINY_NET, lr=1e-3, warmup_steps=4)
    config = module.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    np.testing.assert_allclose(rates, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert all(p.requires_grad for group in optimizer.param_groups for p in group["params"])
    assert not module.network.pos_embed.requires_grad


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gaussian", "flow"])
def test_loss_falls_on_digits(kind):
    L.seed_everything(0)
    module = DiffusionModule(network=TINY_NET, objective=ObjectiveConfig(kind=kind), lr=2e-3, ema_decay=None)
    data = DigitsDataModule(batch_size=64, image_size=8)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer = L.Trainer(max_steps=150, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, callbacks=[Record()])  # fmt: skip
    trainer.fit(module, data)
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20])


@pytest.mark.slow
def test_checkpoint_rebuilds_the_ema_network_and_samples(tiny_args, tmp_path, capsys):
    assert main(["fit", *tiny_args, "--trainer.max_steps", "3"]) == 0
    ckpt = next(Path(tmp_path / "runs").rglob("last.ckpt"))
    checkpoint = read_checkpoint(ckpt)
    network = network_from_checkpoint(checkpoint)
    assert network.depth == 2
    state = checkpoint["state_dict"]
    for name, value in network.state_dict().items():
        assert torch.equal(value, state[f"ema.{name}"])
    bundle = bundle_from_checkpoint(ckpt)
    assert bundle.sampling.steps == 5
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(ckpt), "--num", "12", "--out", str(out), "--steps", "3"]) == 0
    batch = np.load(out / "samples.npz")
    assert batch["arr_0"].shape == (12, 16, 16, 1) and batch["arr_0"].dtype == np.uint8
    assert batch["labels"].tolist() == [i % 10 for i in range(12)]
    assert len(list(out.glob("*.png"))) == 12


def test_sampling_is_seeded_per_image(perturb):
    module = DiffusionModule(network=TINY_NET, sampling=SamplingConfig(sampler="ddim", steps=4), ema_decay=None)
    perturb(module.network, frozen_too=True)
    labels = torch.tensor([1, 2, 3, 4])
    full = module.sample(labels, seed=5)
    tail = module.sample(labels[2:], seed=5, start=2)
    torch.testing.assert_close(full[2:], tail)
    assert not torch.allclose(full[0], module.sample(labels[:1], seed=6)[0])


@pytest.mark.parametrize("problem, message", [("missing", "does not exist"), ("corrupt", "truncated or corrupt")])
def test_bad_checkpoints_get_one_line(problem, message, tmp_path, capsys):
    path = tmp_path / "bad.ckpt"
    if problem == "corrupt":
        torch.save({"state_dict": {"x": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main(["sample", "--ckpt", str(path), "--num", "2", "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]


def test_an_ema_too_slow_for_the_run_is_named_at_the_start_of_fit(capsys):
    """0.999 over 1,000 steps keeps 37% of the starting weights in the EMA network: a sampled grid is noise."""
    import types

    from ditlab.methods.base import fresh_ema_decay, stale_ema_share

    assert stale_ema_share(0.999, 1000) == pytest.approx(0.3677, abs=1e-4)
    for steps in (10, 500, 1000, 20000):  # the suggested decay clears the 5% line, and is not needlessly fast
        suggested = fresh_ema_decay(steps)
        assert stale_ema_share(suggested, steps) <= 0.05 < stale_ema_share(suggested + 0.002, steps)
    assert stale_ema_share(None, 1000) == 0.0 and stale_ema_share(0.999, 0) == 0.0
    for decay, steps, warned in [(0.999, 1000, True), (0.995, 1000, False), (0.999, 4000, False), (None, 10, False)]:
        module = DiffusionModule(network=DiTConfig(preset="digits", depth=1, hidden_size=32, num_heads=2),
                                 ema_decay=decay)  # fmt: skip
        module._trainer = types.SimpleNamespace(max_steps=steps, global_step=0, is_global_zero=True, callbacks=[])
        module.on_fit_start()
        lines = [line for line in capsys.readouterr().out.splitlines() if "ema_decay" in line]
        assert len(lines) == warned, (decay, steps, lines)
        if warned:
            assert "keeps 37% of the starting weights" in lines[0] and "(e.g. 0.997)" in lines[0]
