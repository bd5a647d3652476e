"""DynamicModule: the FLOPs ratio follows its target with one optimiser step per update, stratified timesteps,
the exported checkpoint that every tool loads, and one-line errors for bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from ditlab.cli import main
from ditlab.data.digits import DigitsDataModule
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.dynamic.export import export, export_checkpoint, save_checkpoint
from ditlab.methods.dynamic.module import DynamicConfig, DynamicModule, width_table_image
from ditlab.methods.teacher import TeacherConfig
from ditlab.models.loading import load_matching, load_network

SAMPLING = SamplingConfig(steps=4)


@pytest.fixture
def teacher_file(tiny_dit, tmp_path):
    return save_checkpoint(tiny_dit(std=0.05), tmp_path / "teacher.ckpt", ObjectiveConfig(), SAMPLING)


def fit(module: DynamicModule, steps: int) -> list[dict]:
    records = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            records.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, callbacks=[Record()],
                        enable_model_summary=False, gradient_clip_val=1.0)  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=32, image_size=8))
    return records


def test_dydit_training_pulls_the_flops_ratio_to_its_target_with_one_step_per_update(teacher_file):
    L.seed_everything(0)
    module = DynamicModule(teacher=TeacherConfig(checkpoint=str(teacher_file)), sampling=SAMPLING, lr=1e-3,
                           ema_decay=0.9, dynamic=DynamicConfig(trunk="dydit", flops_target=0.5, target_hold_steps=2,
                                                                target_warmup_steps=4, complete_model_steps=10,
                                                                router_lr_scale=30.0))  # fmt: skip
    records = fit(module, 40)
    assert records[0]["train/flops_ratio"] == 1.0 and records[0]["train/flops_target"] == 1.0
    assert records[-1]["train/flops_target"] == 0.5
    assert records[-1]["train/flops_ratio"] < 0.85  # the routers switched heads, groups and tokens off
    complete = [r["train/loss_complete"] for r in records]
    assert len(set(complete[:10])) == 10 and set(complete[10:]) == {complete[9]}  # logged in stage 1 only
    optimizer = module.trainer.optimizers[0]
    steps = {int(optimizer.state[p]["step"]) for p in module.network.parameters() if p in optimizer.state}
    assert steps == {40}  # one AdamW step per update (DyDiT's train.py steps twice)
    image = width_table_image(module.sampling_network)
    assert image.shape == (1, 2 * module.network.depth, 1000) and 0 <= image.min() and image.max() <= 1


def test_stratified_timesteps_cover_every_range_evenly(teacher_file):
    module = DynamicModule(teacher=TeacherConfig(checkpoint=str(teacher_file)), sampling=SAMPLING, ema_decay=None)
    module.configure_model()
    images = torch.zeros(8, 1, 8, 8)
    noised = module.objective.prepare(images, generator=torch.Generator().manual_seed(0))
    folded = module.stratify(noised, images)
    assert (folded.t // 250).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    torch.testing.assert_close(folded.xt, module.objective.add_noise(images, folded.t, noised.noise))


@pytest.mark.parametrize("trunk", ["dydit", "elastic", "chunking"])
def test_an_exported_checkpoint_loads_as_a_normal_ditlab_network(trunk, tiny_dit, dit_inputs, make_dynamic, scramble,
                                                                 tmp_path):  # fmt: skip
    dynamic = make_dynamic(tiny_dit(), trunk)
    scramble(dynamic.trunk, seed=5, std=0.3)
    exported = export(dynamic)
    path = save_checkpoint(exported, tmp_path / "dynamic.ckpt", ObjectiveConfig(), SAMPLING)
    loaded = load_network(path)
    x, t, y = dit_inputs(loaded)
    assert loaded.config.trunk == trunk and torch.equal(loaded(x, t, y), exported(x, t, y))
    training = save_checkpoint(dynamic, tmp_path / "run.ckpt", ObjectiveConfig(), SAMPLING)  # routers, no table
    again = load_network(export_checkpoint(training, tmp_path / "again.ckpt"))
    assert again.config == exported.config and torch.equal(again(x, t, y), exported(x, t, y))
    assert main(["export", "--ckpt", str(training), "--out", str(tmp_path / "cli.ckpt")]) == 0  # `ditlab export`
    assert torch.equal(load_network(tmp_path / "cli.ckpt")(x, t, y), exported(x, t, y))


def test_bad_input_is_one_line(teacher_file, tiny_dit, make_dynamic, tmp_path):
    for target in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"flops_target=.* must be in \(0, 1\]"):
            DynamicConfig(flops_target=target)
    dynamic = make_dynamic(tiny_dit(), "dydit")
    with pytest.raises(ValueError, match="weights of a dynamic-compute network .*load it with load_network"):
        load_matching(tiny_dit(), dynamic.state_dict(), "checkpoint")
    path = save_checkpoint(dynamic, tmp_path / "dynamic.ckpt", ObjectiveConfig(), SAMPLING)
    module = DynamicModule(teacher=TeacherConfig(checkpoint=str(path)), sampling=SAMPLING, ema_decay=None)
    with pytest.raises(ValueError, match="already routes its blocks \\(trunk 'dydit'\\)"):
        module.configure_model()
    with pytest.raises(ValueError, match="not a dynamic one"):
        export(tiny_dit())


def test_block_level_tools_refuse_a_dynamic_network_instead_of_running_its_plain_blocks(tiny_dit, dit_inputs,
                                                                                        make_dynamic):  # fmt: skip
    from ditlab.diffusion.gaussian import GaussianDiffusion
    from ditlab.methods.sampling.caches import build_policy
    from ditlab.models.taps import run_block_range, run_blocks

    dynamic = make_dynamic(tiny_dit(), "dydit")
    x, t, y = dit_inputs(dynamic)
    tokens, cond = dynamic.embed(x, t, y)
    for call in (lambda: run_blocks(dynamic, x, t, y, hidden=[0]), lambda: run_block_range(dynamic, tokens, cond),
                 lambda: build_policy(dynamic, {"policy": "fora", "interval": 2}, GaussianDiffusion(), "ddim", 6)):
        with pytest.raises(ValueError, match="'dydit' trunk .*cannot follow") as error:
            call()
        assert "\n" not in str(error.value)
