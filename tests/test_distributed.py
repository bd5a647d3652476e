"""Two CPU processes (gloo) under DDP and FSDP2 train exactly what one process trains, and resume exactly.

Every run is a real ``python -m ditlab fit`` (Lightning starts the second process by re-running the command).
A global batch of 16 is one process at batch 16 or two at batch 8; the draws of noise, timesteps, label
drop-out and data order belong to the global batch (``ditlab.diffusion.global_batch``), so the weights and
logged losses agree to float tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ditlab.analysis import scalar_series
from ditlab.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NETWORK = [
    "--model.init_args.network.hidden_size", "32",
    "--model.init_args.network.depth", "3",
    "--model.init_args.network.num_heads", "2",
]  # fmt: skip
TINY = [
    "--model.init_args.sampling.steps", "3",
    "--model.init_args.warmup_steps", "0",
    "--trainer.enable_progress_bar", "false",
    "--trainer.log_every_n_steps", "1",
    "--trainer.num_sanity_val_steps", "0",
]  # fmt: skip
STRATEGIES = {
    "single": ["--trainer.devices", "1"],
    "ddp": ["--config", str(ROOT / "configs" / "trainer" / "ddp.yaml"), "--trainer.accelerator", "cpu",
            "--trainer.devices", "2", "--trainer.precision", "32-true"],
    "fsdp": ["--config", str(ROOT / "configs" / "trainer" / "fsdp.yaml"), "--trainer.accelerator", "cpu",
             "--trainer.devices", "2", "--trainer.strategy.init_args.param_dtype", "null",
             "--trainer.strategy.init_args.reduce_dtype", "null"],
    "fsdp-1": ["--config", str(ROOT / "configs" / "trainer" / "fsdp.yaml"), "--trainer.accelerator", "cpu",
               "--trainer.devices", "1", "--trainer.strategy.init_args.param_dtype", "null",
               "--trainer.strategy.init_args.reduce_dtype", "null"],
}  # fmt: skip
PROCESSES = {"single": 1, "ddp": 2, "fsdp": 2, "fsdp-1": 1}


def fit(out: Path, strategy: str, *args: str, global_batch: int = 16, config: str = "dit.yaml",
        network: list[str] = NETWORK) -> Path:  # fmt: skip
    """Run ``ditlab fit`` (a tiny 3-block network unless ``network=[]``) and return its log directory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "ditlab", "fit", "--config", str(ROOT / "configs" / config), *network, *TINY,
               *STRATEGIES[strategy], "--data.init_args.batch_size", str(global_batch // PROCESSES[strategy]),
               "--trainer.logger.init_args.save_dir", str(out), *args]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=out.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return next(out.glob("*/version_*"))


def losses(run: Path, tag: str = "train/loss") -> dict[int, float]:
    return dict(scalar_series(run, tag))


def weights(run: Path, name: str = "final.ckpt") -> dict[str, torch.Tensor]:
    state = read_checkpoint(run / "checkpoints" / name)["state_dict"]
    return {key: value for key, value in state.items() if key.startswith(("network.", "ema."))}


def assert_same_training(run: Path, reference: Path, steps: range) -> None:
    ours, theirs = losses(run), losses(reference)
    assert set(steps) <= set(ours), sorted(ours)
    for step in steps:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-5, abs=1e-6), step
    ours, theirs = weights(run), weights(reference)
    assert ours.keys() == theirs.keys() and any(k.startswith("ema.") for k in ours)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=2e-6, msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, batch 16, 4 steps."""
    return fit(tmp_path_factory.mktemp("single") / "runs", "single", "--trainer.max_steps", "4")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_what_one_process_trains(tmp_path, reference, strategy):
    run = fit(tmp_path / "runs", strategy, "--trainer.max_steps", "4")
    assert_same_training(run, reference, range(0, 4))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and str(summary["config"]["trainer"]["devices"]) == "2"
    if strategy == "fsdp":  # a folder of shards, one per process, that the tools read like a file
        from ditlab.cli import main

        folder = run / "checkpoints" / "final.ckpt"
        assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert main(["sample", "--ckpt", str(folder), "--num", "3", "--out", str(tmp_path / "samples"),
                     "--steps", "2"]) == 0  # fmt: skip
        assert len(list((tmp_path / "samples").glob("*.png"))) == 3
        (folder / "__1_0.distcp").write_bytes(b"truncated")
        with pytest.raises(ValueError, match="incomplete or corrupt"):
            read_checkpoint(folder)


@pytest.mark.slow
@pytest.mark.parametrize("resume_on", ["fsdp", "fsdp-1"])
def test_sharded_checkpoint_resumes_on_the_same_trajectory(tmp_path, reference, resume_on):
    """Stop an FSDP run at step 2, resume it (on 2 processes, or on 1) to step 4: the uninterrupted run's losses."""
    first = fit(tmp_path / "first", "fsdp", "--trainer.max_steps", "2")
    resumed = fit(tmp_path / "resumed", resume_on, "--trainer.max_steps", "4",
                  "--ckpt_path", str(first / "checkpoints" / "final.ckpt"))  # fmt: skip
    assert min(losses(resumed)) == 2  # steps 2 and 3 were trained after the resume
    assert_same_training(resumed, reference, range(2, 4))


@pytest.mark.slow
def test_fsdp_options_mixed_precision_accumulation_clipping_checkpointing(tmp_path):
    """bf16 compute with fp32 reduction, gradient accumulation, clipping and activation checkpointing together."""
    run = fit(tmp_path / "runs", "fsdp", "--trainer.max_steps", "3", "--trainer.strategy.init_args.param_dtype",
              "bfloat16", "--trainer.strategy.init_args.reduce_dtype", "float32", "--trainer.accumulate_grad_batches",
              "2", "--trainer.gradient_clip_val", "0.5", "--model.init_args.activation_checkpointing", "true")  # fmt: skip
    assert sorted(losses(run)) == [0, 1, 2]
    state = weights(run)
    assert all(value.dtype == torch.float32 for value in state.values())  # sharded masters stay float32
    gates = [value for key, value in state.items() if key.startswith("network.") and "adaLN_modulation" in key]
    assert gates and all(gate.abs().sum() > 0 for gate in gates)  # zero-initialised, so nonzero means trained


@pytest.fixture(scope="module")
def encoder_cache(tmp_path_factory) -> Path:
    """The digits ViT that REPA aligns to, trained once here so two processes never race to train it."""
    from ditlab.methods.align.encoders import digits_vit

    cache = tmp_path_factory.mktemp("cache")
    digits_vit(cache)
    return cache


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_alignment_runs_distributed(tmp_path, encoder_cache, strategy, monkeypatch):
    monkeypatch.setenv("DITLAB_CACHE", str(encoder_cache))
    """HASTE: REPA's feature term on block 2's hidden state and attention maps of blocks 1-2, all tapped."""
    run = fit(tmp_path / "runs", strategy, "--trainer.max_steps", "3", "--model.init_args.feature.blocks", "[2]",
              "--model.init_args.feature.projector_hidden", "32", "--model.init_args.attention.blocks", "[1, 2]",
              "--model.init_args.attention.encoder_blocks", "[3, 4]", "--model.init_args.attention.heads", "mean",
              "--trainer.callbacks", "[]",
              config="haste.yaml")  # fmt: skip
    feature, attention = losses(run, "train/loss_align_feature"), losses(run, "train/loss_align_attention")
    assert sorted(feature) == sorted(attention) == [0, 1, 2]
    assert all(-1.0 <= value <= 1.0 for value in feature.values())  # negative cosine
    assert all(value > 0 for value in attention.values())  # cross-entropy to the encoder's maps
    state = weights(run) | read_checkpoint(run / "checkpoints" / "final.ckpt")["state_dict"]
    assert any(key.startswith("heads.") for key in state)  # the projector trained and was saved (sharded too)
    assert not any("encoder" in key or "_target" in key for key in state)  # the frozen encoder stays out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_dicomp_runs_distributed(tmp_path, reference, strategy):
    config = yaml.safe_load((ROOT / "configs" / "dicomp.yaml").read_text())
    config["trainer"]["callbacks"] = [  # a progressive stage 2 -> 1 block at step 2; the report gathers the student
        {"class_path": "ditlab.callbacks.progressive.ProgressiveDistillation",
         "init_args": {"at_steps": [2], "blocks": [1]}},
        {"class_path": "ditlab.callbacks.compression_report.CompressionReport",
         "init_args": {"num_samples": 0, "throughput_batch": 4, "steps": 2}}]
    config["model"]["init_args"]["teacher"]["checkpoint"] = str(reference / "checkpoints" / "final.ckpt")
    config["model"]["init_args"]["prune"].update(num_blocks=2, calibration_images=32)
    path = tmp_path / "dicomp.yaml"
    path.write_text(yaml.safe_dump(config))
    run = fit(tmp_path / "runs", strategy, "--trainer.max_steps", "4", config=str(path), network=[])
    assert sorted(losses(run, "train/loss_kd_output")) == [0, 1, 2, 3]  # trained on after the stage
    assert weights(run, "stage_0_blocks_2.ckpt").keys() > {"network.blocks.1.attn.qkv.weight"}
    state = weights(run)
    assert {key.split(".")[2] for key in state if key.startswith("network.blocks.")} == {"0"}  # 1-block student
    assert not any(key.startswith(("teacher", "_teacher")) for key in state)
    summary = json.loads((run / "summary.json").read_text())
    assert [stage["blocks"] for stage in summary["stages"]] == [1]
    assert summary["student"]["blocks"] == 1 and summary["teacher"]["blocks"] == 3
    assert summary["student_vs_teacher"]["parameters_ratio"] < 1


def tiny_module(**options):
    from ditlab.methods.base import DiffusionModule
    from ditlab.models.config import DiTConfig

    network = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=2,
                            num_classes=10)  # fmt: skip
    torch.manual_seed(0)
    return DiffusionModule(network=network, ema_decay=0.9, **options)


def loss_and_grads(module, images, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad()
    module.seed_training_draws(3)
    loss = module.training_losses(images, labels)["loss"]
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in module.network.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("option", ["activation_checkpointing", "compile"])
def test_block_options_keep_names_losses_and_gradients(option, monkeypatch):
    """Checkpointed or compiled blocks compute the same loss and gradients under the same parameter names."""
    import ditlab.distributed

    if option == "compile":  # the eager backend keeps the test fast; the inductor path is timed in bench/scaling.py
        real = ditlab.distributed.compile_blocks
        monkeypatch.setattr("ditlab.methods.base.compile_blocks", lambda network: real(network, backend="eager"))
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    plain, edited = tiny_module(), tiny_module(**{option: True})
    edited.load_state_dict(plain.state_dict())
    edited.configure_model()
    assert edited.state_dict().keys() == plain.state_dict().keys()
    if option == "compile":
        assert all(block._compiled_call_impl is not None for block in edited.network.blocks)
    loss, grads = loss_and_grads(plain, images, labels)
    edited_loss, edited_grads = loss_and_grads(edited, images, labels)
    torch.testing.assert_close(edited_loss, loss)
    assert edited_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(edited_grads[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_plain_model_parallel_strategy_is_refused_with_the_fix():
    from lightning.pytorch.strategies import ModelParallelStrategy

    module = tiny_module()
    module._trainer = type("Trainer", (), {"strategy": ModelParallelStrategy()})()
    with pytest.raises(ValueError, match="ditlab.distributed.FSDP2Strategy"):
        module.configure_model()


def test_training_draws_split_the_global_batch_by_rank():
    """Rank r of W gets rows r, r+W, ... of the draws one process makes for the whole batch."""
    from ditlab.diffusion.global_batch import draw_rows

    def draw(n: int) -> torch.Tensor:
        return torch.randn(n, 3, generator=torch.Generator().manual_seed(0))

    whole = draw_rows(draw, 6)
    parts = [draw_rows(draw, 3, rank, 2) for rank in range(2)]
    torch.testing.assert_close(torch.stack(parts, 1).reshape(6, 3), whole, rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside world size"):
        draw_rows(draw, 3, 2, 2)


@pytest.mark.slow
def test_self_transcendence_runs_distributed(tmp_path):
    """Phase 1 (clean-velocity head) under DDP, then phase 2 (guided features of that frozen teacher) under FSDP."""
    common = ["--trainer.max_steps", "3", "--trainer.callbacks", "[]", "--model.init_args.clean.block", "2",
              "--model.init_args.clean.hidden", "32"]  # fmt: skip
    first = fit(tmp_path / "phase1", "ddp", *common, "--model.init_args.phase", "1", config="self_transcendence.yaml")
    assert sorted(losses(first, "train/loss_align_clean")) == [0, 1, 2]
    second = fit(tmp_path / "phase2", "fsdp", *common, "--model.init_args.phase", "2",
                 "--model.init_args.guided.teacher_block", "3", "--model.init_args.guided.block", "2",
                 "--model.init_args.teacher.checkpoint", str(first / "checkpoints" / "final.ckpt"),
                 config="self_transcendence.yaml")  # fmt: skip
    guided = losses(second, "train/loss_align_guided")
    assert sorted(guided) == [0, 1, 2] and all(value > 0 for value in guided.values())
    assert not any(key.startswith(("teacher", "_target")) for key in weights(second))  # the teacher stays out


TEXT = ["--model.init_args.network.condition_options.encoder", "random-words",
        "--trainer.callbacks", "[]", "--data.init_args.train_length", "256",
        "--data.init_args.val_length", "16"]  # fmt: skip


@pytest.fixture(scope="module")
def text_reference(tmp_path_factory) -> Path:
    """One process, batch 16, 4 steps of the text-conditioned MM-DiT (SD3 blocks) on captioned digit scenes."""
    return fit(tmp_path_factory.mktemp("text") / "runs", "single", "--trainer.max_steps", "4", *TEXT, config="mmdit.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_the_text_mmdit_one_process_trains(tmp_path, text_reference, strategy):
    """Caption drop-out draws, joint text/image blocks (each a shard unit under FSDP2) and the text path: 2 = 1."""
    run = fit(tmp_path / "runs", strategy, "--trainer.max_steps", "4", *TEXT, config="mmdit.yaml")
    assert_same_training(run, text_reference, range(0, 4))
    ours, theirs = weights(run), weights(text_reference)
    worst = max(float((ours[k] - theirs[k]).norm() / theirs[k].norm().clamp_min(1e-12)) for k in theirs)
    print(f"{strategy}: max relative weight difference over {len(theirs)} tensors: {worst:.2e}")
    assert any(".attn.context_qkv." in key for key in theirs)  # the text stream's own weights were trained and compared
