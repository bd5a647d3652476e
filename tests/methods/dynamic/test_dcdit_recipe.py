"""``configs/dcdit.yaml`` as DC-DiT has it (arXiv 2603.06351 Table 6; AMD-AGI/DynamicChunkingDiT b939538
``config.py`` / ``train.py``): ratio-loss weight 0.03 in groups of 16, uniform timesteps, no FLOPs or complete-model
loss, and its upcycling's frozen timestep and class embedders (``DynamicConfig.freeze``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from ditlab.data.digits import DigitsDataModule
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.dynamic.export import save_checkpoint
from ditlab.methods.dynamic.module import DynamicConfig, DynamicModule
from ditlab.methods.teacher import TeacherConfig
from ditlab.models.loading import load_network

RECIPE = Path(__file__).resolve().parents[3] / "configs" / "dcdit.yaml"
SAMPLING = SamplingConfig(steps=4)
FROZEN = ("t_embedder.", "y_embedder.")


@pytest.fixture
def teacher_file(tiny_dit, tmp_path):
    return save_checkpoint(tiny_dit(std=0.05), tmp_path / "teacher.ckpt", ObjectiveConfig(), SAMPLING)


def test_the_recipe_has_the_papers_ratio_loss_timesteps_and_upcycling_freeze():
    dynamic = yaml.safe_load(RECIPE.read_text())["model"]["init_args"]["dynamic"]
    config = DynamicConfig(**dynamic)
    assert (config.trunk, config.init) == ("chunking", "teacher")
    assert (config.ratio_weight, config.ratio_group, config.strata) == (0.03, 16, 1)  # was 1.0 and strata 4
    assert (config.flops_weight, config.complete_model_steps) == (0.0, 0)
    assert config.trunk_options["smoothing"] == 1.0  # the dechunker's Gaussian sigma
    assert config.freeze == ["t_embedder", "y_embedder"]


def test_frozen_embedders_keep_the_teachers_weights_and_the_rest_trains(teacher_file):
    L.seed_everything(0)
    module = DynamicModule(teacher=TeacherConfig(checkpoint=str(teacher_file)), sampling=SAMPLING, lr=1e-3,
                           ema_decay=None, dynamic=DynamicConfig(trunk="chunking", trunk_options={"router_bias": 0.0},
                                                                 flops_weight=0.0, complete_model_steps=0, strata=1,
                                                                 freeze=["t_embedder", "y_embedder"]))  # fmt: skip
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=32, image_size=8))
    teacher = load_network(teacher_file).state_dict()
    after = module.network.state_dict()
    frozen = [name for name in teacher if name.startswith(FROZEN)]
    assert frozen and all(torch.equal(after[name], teacher[name]) for name in frozen)
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    named = dict(module.network.named_parameters())
    assert not any(id(named[name]) in optimised for name in named if name.startswith(FROZEN))


def test_a_freeze_prefix_that_names_nothing_is_one_line(teacher_file):
    module = DynamicModule(teacher=TeacherConfig(checkpoint=str(teacher_file)), sampling=SAMPLING,
                           dynamic=DynamicConfig(trunk="chunking", freeze=["t_embeder"]))  # fmt: skip
    with pytest.raises(ValueError, match="model.dynamic.freeze names 't_embeder', which is no module"):
        module.configure_model()
