"""Shared fixtures: a tiny digits config that trains in seconds, tiny DiTs whose blocks matter, their inputs,
parameter noise, a tiny teacher checkpoint and a simulated Ctrl-C."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from ditlab.models.dit import DiT

if TYPE_CHECKING:
    import lightning as L

os.environ.setdefault("PYTHONHASHSEED", "0")
ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "--model.init_args.network.hidden_size", "32",
    "--model.init_args.network.depth", "2",
    "--model.init_args.network.num_heads", "2",
    "--model.init_args.sampling.steps", "5",
    "--data.init_args.batch_size", "16",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip


@pytest.fixture
def tiny_args(tmp_path: Path) -> list[str]:
    """CLI arguments for a tiny ``configs/dit.yaml`` run logging under ``tmp_path``."""
    return ["--config", str(ROOT / "configs" / "dit.yaml"), *TINY,
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]  # fmt: skip


@pytest.fixture(autouse=True, scope="session")
def one_thread_per_process():
    """Tiny networks run faster on one thread, and DDP tests start two processes on two cores."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield


# --- tiny networks and their inputs ----------------------------------------------------------------------

TINY_DIT = {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 6, "num_heads": 2,
            "num_classes": 10}  # fmt: skip


def randomize_zero_init(dit: DiT, std: float = 0.1, seed: int = 1) -> DiT:
    """Random values (``std``, from ``seed``) in the layers adaLN-Zero starts at 0: every block's modulation
    and the final layer's modulation and output. At init each block is the identity and the output is 0."""
    generator = torch.Generator().manual_seed(seed)
    layers = [block.adaLN_modulation[-1] for block in dit.blocks]
    layers += [dit.final_layer.adaLN_modulation[-1], dit.final_layer.linear]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * std)
    return dit


def build_tiny_dit(std: float = 0.1, seed: int = 0, **fields) -> DiT:
    """An eval-mode DiT of :data:`TINY_DIT` (``fields`` override it) built under ``torch.manual_seed(seed)``,
    its zero-initialised layers then randomised with ``std`` from ``seed + 1`` (``std=0`` keeps adaLN-Zero)."""
    torch.manual_seed(seed)
    dit = DiT(**{**TINY_DIT, **fields})
    if std:
        randomize_zero_init(dit, std, seed + 1)
    return dit.eval()


def random_inputs(dit: DiT, size: int = 3, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, t, y)`` for ``dit``: Gaussian images, float timesteps in [0, 1000), real class labels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, dit.in_channels, dit.input_size, dit.input_size, generator=generator)
    t = torch.randint(0, 1000, (size,), generator=generator).float()
    y = torch.randint(0, dit.num_classes, (size,), generator=generator)
    return x, t, y


def add_noise(
    module: torch.nn.Module, seed: int = 0, scale: float = 0.05, frozen_too: bool = False
) -> torch.nn.Module:
    """Add ``scale`` Gaussian noise to every trainable parameter (to frozen ones too, such as DiT's position
    embedding, with ``frozen_too``), so no weight keeps the value its init gave it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad or frozen_too:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return module


@pytest.fixture(scope="session")
def tiny_dit() -> Callable[..., DiT]:
    """``tiny_dit(std=0.1, seed=0, **fields)``: an 8x8, one-channel, 10-class DiT (width 32, 6 blocks of 2
    heads) whose adaLN and output layers are random, so no block is the identity (see ``build_tiny_dit``)."""
    return build_tiny_dit


@pytest.fixture(scope="session", name="randomize_zero_init")
def randomize_zero_init_fixture() -> Callable[..., DiT]:
    """``randomize_zero_init(dit, std=0.1, seed=1)``: give ``dit``'s adaLN-Zero layers random values in place."""
    return randomize_zero_init


@pytest.fixture(scope="session")
def dit_inputs() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``dit_inputs(dit, size=3, seed=2) -> (x, t, y)``: a seeded random batch that fits ``dit``."""
    return random_inputs


@pytest.fixture(scope="session")
def perturb() -> Callable[..., torch.nn.Module]:
    """``perturb(module, seed=0, scale=0.05, frozen_too=False)``: seeded noise on every weight, in place."""
    return add_noise


# --- training runs ----------------------------------------------------------------------------------------


def save_teacher(dit: DiT, path: Path) -> Path:
    """``dit`` as a ditlab checkpoint (what ``load_teacher`` reads): config, weights, objective, sampling (DDIM,
    4 steps, cfg 2)."""
    from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
    from ditlab.models.loading import network_checkpoint

    torch.save(network_checkpoint(dit, ObjectiveConfig(), SamplingConfig(sampler="ddim", steps=4, cfg_scale=2.0)), path)
    return path


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory, tiny_dit) -> Path:
    """A 4-block 8x8 DiT (learned sigma, random adaLN so every branch matters) saved as a teacher checkpoint."""
    return save_teacher(tiny_dit(depth=4, learn_sigma=True), tmp_path_factory.mktemp("teacher") / "teacher.ckpt")


@pytest.fixture(scope="session")
def interrupt_at() -> Callable[[int], L.Callback]:
    """``interrupt_at(step)``: a Lightning callback that simulates Ctrl-C once ``step`` optimiser steps are done
    (in ``on_train_batch_end``, so before any callback listed after it sees that step)."""
    import lightning as L

    class Interrupt(L.Callback):
        def __init__(self, at: int) -> None:
            self.at = at

        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == self.at:
                raise KeyboardInterrupt

    return Interrupt


# --- a recognizer that knows the truth ----------------------------------------------------------------------


class SceneLookup(torch.nn.Module):
    """A scene recognizer that finds each image among ``images`` (exactly) and reports ``scenes``' true
    detections for it (nothing for an image it does not know): compositional accuracy with the answer known."""

    def __init__(self, images: torch.Tensor, scenes: list) -> None:
        super().__init__()
        self.known, self.scenes = images.flatten(1), scenes
        self.weight = torch.nn.Parameter(torch.zeros(1))  # so .to(device) has something to move

    def forward(self, images: torch.Tensor) -> list:
        from ditlab.metrics.scene_recognizer import Detection

        found = []
        for image in images.flatten(1).cpu():
            hits = (self.known == image).all(1).nonzero().flatten().tolist()
            scene = self.scenes[hits[0]] if hits else None
            found.append([] if scene is None else [Detection(*fields, 1.0) for fields in
                          zip(scene.digits, scene.colours, scene.sizes, scene.positions)])  # fmt: skip
        return found


@pytest.fixture(scope="session")
def validation_lookup() -> SceneLookup:
    """A :class:`SceneLookup` over the first 64 validation scenes."""
    from ditlab.data.scenes import DigitScenes

    scenes = DigitScenes("validation")
    return SceneLookup(scenes.images(range(64)), scenes.attributes(range(64)))
