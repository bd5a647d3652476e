"""dicomp on text-to-image networks (PixArt, SD3 MM-DiT, FLUX double + single blocks): block analysis, depth and
width pruning, PPCL plugs across stream types, distillation, one-line refusals, and the T2I main job cut short.

Tiny random networks with the ``random-words`` text encoder; no teacher is trained and no scene CLIP is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ditlab.cli import main
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.compress.analysis import select_blocks, split_budget, stream_groups
from ditlab.methods.compress.distill import distillation_losses
from ditlab.methods.compress.ppcl import plugged, plugs
from ditlab.methods.compress.prune import (
    family_scores,
    prune_depth,
    prune_width,
    reinitialize,
    segments,
    stack_config,
)
from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT
from ditlab.models.loading import network_checkpoint
from ditlab.models.taps import run_blocks
from ditlab.models.text.prompts import encode_prompts

ROOT = Path(__file__).resolve().parents[3]
CAPTIONS = ["a small red 3 left of a large blue 7 on a grey background", "a large green 1", "",
            "a small yellow 4, a large red 2 and a small white 9 on a black background"]  # fmt: skip
KINDS = ("pixart", "mmdit", "flux")


def text_config(block: str, depth: int = 6, **fields) -> DiTConfig:
    """A tiny 8x8 RGB network of ``block`` kind reading random-words captions (width 32, 2 heads of 16)."""
    options = {"encoder": "random-words", "text_dim": 64, "text_length": 32}
    extra: dict = {}
    if block == "pixart":
        options.update(projection="mlp", adaln="single")
    else:
        options.update(projection="linear", pooled_dim=64)
        extra["qk_norm"] = "rms"
    if block == "mmdit":
        extra["block_options"] = {"context_pre_only": True}
    if block == "flux":
        extra.update(positions="rope", block_options={"double": depth // 2})
    base = {"input_size": 8, "patch_size": 2, "in_channels": 3, "hidden_size": 32, "depth": depth, "num_heads": 2,
            "learn_sigma": block == "pixart", "block": block, "condition": "text", "condition_options": options}
    return DiTConfig(**{**base, **extra, **fields})


def text_network(block: str, depth: int = 6, seed: int = 0, std: float = 0.1, **fields) -> DiT:
    """An eval-mode network whose zero-initialised layers (adaLN-Zero, PixArt's cross-attention output, the head)
    are random, so every block and branch matters."""
    torch.manual_seed(seed)
    dit = DiT(text_config(block, depth, **fields))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in dit.named_parameters():
            if "adaLN_modulation" in name or "cross_attn.proj" in name or name.startswith("final_layer"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return dit.eval()


def batch(dit: DiT, size: int = 4, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 3, dit.input_size, dit.input_size, generator=generator)
    t = torch.rand(size, generator=generator) * 999
    return x, t, encode_prompts(dit.config, [CAPTIONS[i % len(CAPTIONS)] for i in range(size)])


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


# --- depth --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep", [[0, 2, 4], [1, 3, 5], [0, 4, 5], [2, 3], [5], [0]])
def test_depth_pruned_network_equals_the_kept_blocks_of_the_original(kind, keep):
    """Kept blocks keep their weights: the student is the teacher with the dropped blocks skipped, bit for bit. This
    covers dropping the SD3 context-pre-only last block (a kept block becomes it) and FLUX cuts on either side of
    the double/single boundary (the student's ``double`` counts its double-stream blocks)."""
    teacher = text_network(kind)
    student = prune_depth(teacher, keep)
    x, t, text = batch(teacher)
    with torch.no_grad():
        expected = run_blocks(teacher, x, t, text, skip=[b for b in range(teacher.depth) if b not in keep]).output
        assert torch.equal(student(x, t, text), expected)
    assert student.config == stack_config(teacher, [teacher.blocks[b] for b in keep])
    assert DiT(student.config).load_state_dict(student.state_dict()) is not None  # its config rebuilds it
    if kind == "flux":
        assert student.config.block_options["double"] == sum(b < 3 for b in keep)
    if kind == "mmdit":
        assert student.blocks[-1].context_pre_only and not any(b.context_pre_only for b in student.blocks[:-1])


@pytest.mark.parametrize("kind", KINDS)
def test_average_and_random_inits_build_valid_students(kind):
    teacher = text_network(kind)
    x, t, text = batch(teacher)
    averaged = prune_depth(teacher, [1, 4], init="average")
    assert torch.isfinite(averaged(x, t, text)).all()
    # a kept block of one kind is averaged with the segment blocks of its own kind only (FLUX: 1 with 0, 2; 4 with 3, 5)
    mlp = (teacher.blocks[0].mlp.fc1.weight + teacher.blocks[1].mlp.fc1.weight + teacher.blocks[2].mlp.fc1.weight) / 3
    if kind != "flux":
        mlp = (mlp * 3 + teacher.blocks[3].mlp.fc1.weight) / 4
    torch.testing.assert_close(averaged.blocks[0].mlp.fc1.weight, mlp)
    if kind == "mmdit":  # the last block (from 4, standing for 4..5) is averaged in the context-pre-only form
        rows = [teacher.blocks[b].context_adaLN_modulation[1].weight[:64] for b in (4, 5)]
        torch.testing.assert_close(averaged.blocks[1].context_adaLN_modulation[1].weight, (rows[0] + rows[1]) / 2)
    randomised = prune_depth(teacher, [1, 4], init="random", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(randomised(x, t, text)).all()
    if kind != "pixart":  # adaLN-Zero blocks re-initialise to the identity (PixArt's adaLN-single has no zero gate)
        tokens, cond = randomised.embed(x, t, text)
        assert all(torch.equal(block(tokens, cond), tokens) for block in randomised.blocks)
        edited = text_network(kind)
        reinitialize(edited, [0])
        tokens, cond = edited.embed(x, t, text)
        assert torch.equal(edited.blocks[0](tokens, cond), tokens)


# --- width --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_width_pruning_at_full_width_equals_the_original_bitwise(kind):
    teacher = text_network(kind)
    x, t, text = batch(teacher)
    for student in (prune_width(teacher), prune_width(teacher, num_heads=2, mlp_hidden=128, cross_heads=2,
                                                      text_mlp_hidden=128)):  # fmt: skip
        with torch.no_grad():
            assert torch.equal(student(x, t, text), teacher(x, t, text))
        assert student.state_dict().keys() == teacher.state_dict().keys()


def families(kind: str) -> set[str]:
    return {name for scores in family_scores(text_network(kind)) for name in scores}


def test_every_head_and_channel_family_of_the_new_blocks_is_ranked():
    assert families("pixart") == {"attention", "cross_attention", "mlp"}
    assert families("mmdit") == {"joint_attention", "mlp", "text_mlp"}  # the last block has no text MLP
    assert families("flux") == {"joint_attention", "mlp", "text_mlp", "attention"}
    last = family_scores(text_network("mmdit"))[-1]
    assert set(last) == {"joint_attention", "mlp"}


def kill_units(dit: DiT, head: int = 1, channel: int = 5) -> None:
    """Make one head of every head family and one channel of every MLP (almost) dead in every block."""
    scale = 1e-6
    with torch.no_grad():
        for block in dit.blocks:
            params = dict(block.named_parameters())
            for prefix in ("attn.", "attn.image.", "cross_attn."):
                if f"{prefix}qkv.weight" in params:
                    params[f"{prefix}qkv.weight"].view(3, 2, 16, 32)[:, head] *= scale
                    params[f"{prefix}proj.weight"].view(32, 2, 16)[:, head] *= scale
            if "attn.context_qkv.weight" in params:
                params["attn.context_qkv.weight"].view(3, 2, 16, 32)[:, head] *= scale
                if "attn.context_proj.weight" in params:
                    params["attn.context_proj.weight"].view(32, 2, 16)[:, head] *= scale
            if "cross_attn.q_linear.weight" in params:
                params["cross_attn.q_linear.weight"].view(2, 16, 32)[head] *= scale
                params["cross_attn.kv_linear.weight"].view(2, 2, 16, 32)[:, head] *= scale
                params["cross_attn.proj.weight"].view(32, 2, 16)[:, head] *= scale
            for prefix in ("mlp.", "context_mlp."):
                if f"{prefix}fc1.weight" in params:
                    params[f"{prefix}fc1.weight"][channel] *= scale
                    params[f"{prefix}fc2.weight"][:, channel] *= scale


@pytest.mark.parametrize("kind", KINDS)
def test_width_pruning_removes_the_dead_head_of_every_family_and_the_dead_channel_of_every_mlp(kind):
    teacher = text_network(kind)
    kill_units(teacher)
    student = prune_width(teacher, num_heads=1, mlp_hidden=127)
    x, t, text = batch(teacher)
    with torch.no_grad():
        reference = teacher(x, t, text)
        change = (student(x, t, text) - reference).abs().max()
    assert change < 1e-4 * reference.abs().max()
    for block, source in zip(student.blocks, teacher.blocks):
        for name, parameter in block.named_parameters():
            if name.endswith("fc1.weight"):  # channel 5 went, the others stayed in order
                kept = [c for c in range(128) if c != 5]
                assert torch.equal(parameter, dict(source.named_parameters())[name][kept])
    # removing live units instead changes the output clearly
    lively = text_network(kind)
    with torch.no_grad():
        assert (prune_width(lively, num_heads=1, mlp_hidden=64)(x, t, text) - lively(x, t, text)).abs().max() > 1e-3


def test_width_refusals_are_one_line():
    pixart, mmdit = text_network("pixart"), text_network("mmdit")
    with pytest.raises(ValueError) as error:
        prune_width(pixart, num_heads=1, cross_heads=2)
    assert "cross_heads=2 differs from num_heads=1" in one_line(error)
    with pytest.raises(ValueError) as error:
        prune_width(mmdit, mlp_hidden=64, text_mlp_hidden=32)
    assert "text_mlp_hidden=32 differs from mlp_hidden=64" in one_line(error)
    moe = DiT(text_config("pixart", mlp="moe", mlp_options={"num_experts": 2, "top_k": 1, "expert_hidden": 16}))
    with pytest.raises(ValueError) as error:
        prune_width(moe, num_heads=1)
    assert "dense MLP" in one_line(error)


# --- block analysis -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("criterion", ["laptop", "amber", "ppcl", "tinyfusion", "random"])
def test_every_criterion_selects_blocks_of_a_text_network(kind, criterion):
    from ditlab.diffusion import FlowMatching

    dit = text_network(kind)
    x, _, text = batch(dit, 8)
    num_keep = 3
    options = {"steps": 2, "batch_size": 4, "group_size": 2} if criterion == "tinyfusion" else {}
    if kind == "flux" and criterion == "tinyfusion":  # N:M groups inside each stream type: 2 of every 3
        options["group_size"], num_keep = 3, 4
    selection = select_blocks(dit, FlowMatching(), x, text, criterion, num_keep, num_timesteps=2, **options)
    assert len(selection.keep) == num_keep and torch.isfinite(selection.scores.float()).all()
    student = prune_depth(dit, selection.keep, spans=selection.segments)
    assert student.depth == num_keep
    x, t, text = batch(dit)
    with torch.no_grad():
        assert torch.isfinite(student(x, t, text)).all()


def test_laptop_costs_of_a_text_network_are_its_skipped_block_output_changes():
    from ditlab.diffusion import FlowMatching

    dit = text_network("mmdit")
    x, _, text = batch(dit, 8)
    selection = select_blocks(dit, FlowMatching(), x, text, "laptop", 4, num_timesteps=2)
    # the two cheapest blocks to skip are the dropped ones, and skipping one of them changes the output least
    costs = selection.table["costs"]
    assert sorted(selection.table["dropped"]) == sorted(costs.argsort()[:2].tolist())
    assert (costs > 0).all()


def test_flux_double_and_single_blocks_are_pruned_by_their_own_criteria_and_budgets():
    from ditlab.diffusion import FlowMatching

    dit = text_network("flux")
    x, _, text = batch(dit, 8)
    assert stream_groups(dit) == [[0, 1, 2], [3, 4, 5]]
    assert split_budget([3, 3], 3) == [2, 1] and split_budget([4, 2], 3) == [2, 1] and split_budget([3, 3], 2) == [1, 1]
    selection = select_blocks(dit, FlowMatching(), x, text, ["amber", "last"], [1, 2], num_timesteps=2)
    groups = selection.table["stream_groups"]
    assert [g["kind"] for g in groups] == ["double", "single"] and [g["criterion"] for g in groups] == ["amber", "last"]
    assert selection.keep == [*groups[0]["keep"], 4, 5] and len(groups[0]["keep"]) == 1
    amber = select_blocks(dit, FlowMatching(), x, text, "amber", 1, num_timesteps=2)  # one block: the top double
    assert amber.keep == [int(groups[0]["keep"][0])]
    # a whole group may go: every single-stream block dropped leaves a double-stream-only FLUX network
    doubles = select_blocks(dit, FlowMatching(), x, text, "first", [2, 0])
    assert doubles.keep == [0, 1] and prune_depth(dit, doubles.keep).config.block_options["double"] == 2


def test_dicomp_module_prunes_flux_streams_by_their_own_budgets_and_refuses_num_double_elsewhere(tmp_path):
    from ditlab.methods.compress.module import DicompModule, PruneConfig
    from ditlab.methods.teacher import TeacherConfig

    for kind in ("flux", "mmdit"):
        teacher = text_network(kind)
        path = tmp_path / f"{kind}.ckpt"
        torch.save(network_checkpoint(teacher, ObjectiveConfig(kind="flow"), SamplingConfig()), path)
        prune = PruneConfig(criterion="laptop", single_criterion="first", num_blocks=3, num_double=1,
                            calibration_images=8, num_timesteps=2)  # fmt: skip
        module = DicompModule(teacher=TeacherConfig(checkpoint=str(path)), prune=prune)
        images, text = module.scene_calibration(8)  # the digit scenes and their encoded captions
        assert images.shape == (8, 3, 8, 8) and len(text) == 8
        module.calibration = (images, text)
        if kind == "mmdit":
            with pytest.raises(ValueError) as error:
                module.select(module.teacher, "laptop", 3, num_double=1)
            assert "num_double=1 cannot apply: this network has one stream type" in one_line(error)
            continue
        selection = module.select(module.teacher, "laptop", 3, num_double=1)
        assert [g["criterion"] for g in selection.table["stream_groups"]] == ["laptop", "first"]
        assert sum(b < 3 for b in selection.keep) == 1 and [b for b in selection.keep if b >= 3] == [3, 4]
        with pytest.raises(ValueError) as error:
            module.select(module.teacher, "laptop", 3, num_double=4)
        assert "num_double=4 does not fit" in one_line(error)


def test_selection_refusals_on_stream_types_are_one_line():
    from ditlab.diffusion import FlowMatching

    flux = text_network("flux")
    x, _, text = batch(flux, 8)
    cases = [(("ppcl", [2, 1]), "chooses over the whole stack"),
             ((["ppcl", "amber"], 3), "chooses over the whole stack"),
             (("tinyfusion", 2), "would put double- and single-stream blocks in one N:M group"),
             ((["amber"], 3), "names 1 criteria for 2 stream groups"),
             (("amber", [3, 3, 0]), "one count per stream group")]  # fmt: skip
    for (criterion, num_keep), message in cases:
        with pytest.raises(ValueError) as error:
            select_blocks(flux, FlowMatching(), x, text, criterion, num_keep, num_timesteps=2, group_size=2)
        assert message in one_line(error)


# --- PPCL plugs across stream types ---------------------------------------------------------------------------


def test_ppcl_plugs_may_span_double_and_single_stream_blocks():
    """A plug replacing FLUX blocks 1..4 (two double-, two single-stream) by one double-stream block: all plugs off
    gives back the teacher, all on the student, each bit for bit."""
    teacher = text_network("flux")
    spans = [(0, 0), (1, 4), (5, 5)]
    student = prune_depth(teacher, [0, 2, 5], spans=spans)
    assert student.config.block_options["double"] == 2
    assert [(p.start, p.end, p.student) for p in plugs(spans, teacher.depth)] == [(1, 4, 1)]
    x, t, text = batch(teacher)
    with torch.no_grad():
        assert torch.equal(plugged(teacher, student, spans, [False])(x, t, text), teacher(x, t, text))
        assert torch.equal(plugged(teacher, student, spans, [True])(x, t, text), student(x, t, text))
    assert plugged(teacher, student, spans, [False]).config == teacher.config


def test_a_context_pre_only_block_cannot_be_plugged_before_teacher_blocks():
    teacher = text_network("mmdit")
    spans = [(0, 0), (1, 3), (4, 4)]  # teacher block 5 removed: the student's block 2 is its context-pre-only last
    student = prune_depth(teacher, [0, 2, 4], spans=spans)
    assert student.blocks[-1].context_pre_only
    with torch.no_grad():
        x, t, text = batch(teacher)
        assert torch.equal(plugged(teacher, student, spans, [True, True])(x, t, text), student(x, t, text))
    with pytest.raises(ValueError) as error:  # removal plug off: teacher block 5 would follow the pre-only block
        plugged(teacher, student, spans, [True, False])
    assert "context-pre-only" in one_line(error)


# --- distillation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("teacher_forced", [False, True])
def test_distillation_loss_falls_on_a_tiny_text_network(kind, teacher_forced):
    teacher = text_network(kind)
    keep = [0, 2, 4]
    student = prune_depth(teacher, keep, init="random", generator=torch.Generator().manual_seed(0)).train()
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    x, t, text = batch(teacher, 8)
    drop = torch.zeros(8, dtype=torch.long)
    drop[0] = 1  # one empty caption, shared by student and teacher
    losses = []
    for _ in range(8):
        terms = distillation_losses(student, teacher, x, t, text, keep, output_weight=0.0 if teacher_forced else 1.0,
                                    teacher_forced=teacher_forced, force_drop_ids=drop)  # fmt: skip
        loss = terms["loss_kd_output"] + terms["loss_kd_feature"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


# --- the T2I main job ----------------------------------------------------------------------------------------------


def test_dicomp_t2i_config_names_a_text_teacher_recipe_and_text_metrics():
    config = yaml.safe_load((ROOT / "configs" / "dicomp_t2i.yaml").read_text())
    model = config["model"]["init_args"]
    assert model["teacher"]["recipe"] == "configs/mmdit.yaml" and (ROOT / model["teacher"]["recipe"]).is_file()
    report = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("CompressionReport"))
    assert report["init_args"]["features"] == "scene-clip" and report["init_args"]["reference"] == "scenes"
    assert config["data"]["init_args"]["captions"] is True


@pytest.mark.parametrize("kind", ["mmdit", "pixart"])
def test_dicomp_t2i_main_job_cut_short(kind, tmp_path, monkeypatch):
    """configs/dicomp_t2i.yaml on a tiny random teacher, 3 steps: the student is cut from the teacher with captioned
    calibration scenes, distilled on captions, and the report samples both with validation captions and gives
    FID, CLIP score and compositional accuracy (metric functions stubbed: no scene CLIP in tests)."""
    teacher = text_network(kind, depth=4, input_size=32, patch_size=8)  # the scenes' 32x32, 16 tokens
    objective = ObjectiveConfig(kind="flow") if kind == "mmdit" else ObjectiveConfig()
    path = tmp_path / "teacher.ckpt"
    torch.save(network_checkpoint(teacher, objective, SamplingConfig(sampler="euler" if kind == "mmdit" else "ddim",
                                                                      steps=2, cfg_scale=2.0)), path)  # fmt: skip
    config = yaml.safe_load((ROOT / "configs" / "dicomp_t2i.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=3, val_check_interval=3, enable_progress_bar=False, num_sanity_val_steps=0,
                   limit_val_batches=1)  # fmt: skip
    trainer["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("SampleGrid")]
    trainer["callbacks"][0]["init_args"].update(num_samples=4, throughput_batch=2, steps=2)
    model = config["model"]["init_args"]
    model["teacher"]["checkpoint"] = str(path)
    model["prune"].update(num_blocks=3, calibration_images=16, num_timesteps=2)
    model["phases"][0]["steps"] = 1
    model["warmup_steps"] = 0
    config["data"]["init_args"].update(batch_size=4, image_size=32, train_length=32, val_length=8)
    written = tmp_path / "dicomp_t2i.yaml"
    written.write_text(yaml.safe_dump(config))

    seen: dict[str, list] = {}

    def fake_fid(images, reference, features, **_):
        assert (reference, features) == ("scenes", "scene-clip")
        return {"fid": float(images.abs().mean()) + 1.0, "fid_features": features, "num_samples": len(images)}

    def fake_text_scores(images, prompts, device, cache_dir):
        seen.setdefault("prompts", []).append(list(prompts))
        return {"clip_score": 20.0 + float(images.mean()), "clip_features": "scene-clip",
                "compositional_accuracy": 0.5, "compositional_digit": 0.5}  # fmt: skip

    monkeypatch.setattr("ditlab.metrics.fid.evaluate_images", fake_fid)
    monkeypatch.setattr("ditlab.callbacks.compression_report.text_scores", fake_text_scores)
    assert main(["fit", "--config", str(written)]) == 0
    summary = json.loads(next(tmp_path.glob("runs/dicomp_t2i/version_0/summary.json")).read_text())
    assert summary["student"]["blocks"] == 3 and summary["teacher"]["blocks"] == 4
    for network in ("teacher", "student"):
        assert {"fid", "clip_score", "compositional_accuracy", "sampling_images_per_s"} <= set(summary[network])
    assert {"fid_ratio", "clip_score_ratio", "compositional_accuracy_ratio"} <= set(summary["student_vs_teacher"])
    assert summary["selection"]["criterion"] == "amber" and len(summary["selection"]["keep"]) == 3
    from ditlab.metrics.text_eval import sample_conditions

    assert seen["prompts"] == [sample_conditions(teacher.config, 4)] * 2  # validation captions, sample i caption i
    assert summary["comparison_protocol"]["conditions"].startswith("captions 'validation'")
    ckpt = next(tmp_path.glob("runs/dicomp_t2i/version_0/checkpoints/final.ckpt"))
    recorded = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert DiTConfig.from_dict(recorded["ditlab"]["dit_config"]).depth == 3


def test_segments_of_a_flux_cut_may_cross_stream_types():
    assert segments(6, [0, 2, 5]) == [(0, 1), (2, 4), (5, 5)]
