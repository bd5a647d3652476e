"""A text-conditioned network reads its captions with the text encoder it was trained with, even after the default
of that encoder's kind changes: files record the scene CLIP's whole recipe (pinned), files written before pins
existed read as the recipe that was the default then, and a resumed run adopts the checkpoint's encoder. Nothing
here trains a scene CLIP: the recipe handed to it is what is checked."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

import ditlab.methods.align.encoders.scene_clip as view
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.base import DiffusionModule
from ditlab.metrics.scene_clip import FIRST_RECIPE, SceneCLIPRecipe, scene_clip_path
from ditlab.models.config import DiTConfig
from ditlab.models.interop import load_safetensors, save_safetensors
from ditlab.models.loading import network_checkpoint, network_from_checkpoint, upgrade_layout
from ditlab.models.text.prompts import text_encoder_of
from ditlab.models.text.registry import options_before_pins, pinned_text_options

NETWORK = DiTConfig(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2, learn_sigma=False,
                    block="pixart", condition="text",
                    condition_options={"encoder": "scene-clip", "text_dim": 64, "text_length": 32, "adaln": "single"})  # fmt: skip


def recorded_recipe(config: dict) -> dict:
    return config["condition_options"]["encoder_options"]["recipe"]


def test_pinning_spells_out_the_whole_recipe_and_is_idempotent():
    pinned = pinned_text_options("scene-clip", {"cache_dir": "/somewhere"})
    assert pinned == {"cache_dir": "/somewhere", "recipe": asdict(SceneCLIPRecipe())}
    assert pinned_text_options("scene-clip", pinned) == pinned
    partial = pinned_text_options("scene-clip", {"recipe": {"steps": 50}})
    assert partial["recipe"] == asdict(replace(SceneCLIPRecipe(), steps=50))
    assert pinned_text_options("random-words", {"dim": 8}) == {"dim": 8}  # a kind with no pin is left alone
    with pytest.raises(ValueError, match="recipe fields \\['stepz'\\] do not exist"):
        pinned_text_options("scene-clip", {"recipe": {"stepz": 1}})


def test_the_first_default_recipe_keeps_its_cache_name():
    assert scene_clip_path(recipe=FIRST_RECIPE).name == "scene-clip-923f8c2d28e7.pt"


def test_files_written_before_pins_read_as_the_first_default_recipe():
    assert options_before_pins("scene-clip", {}) == {"recipe": asdict(FIRST_RECIPE)}
    pinned = {"recipe": asdict(replace(SceneCLIPRecipe(), steps=123))}
    assert options_before_pins("scene-clip", pinned) == pinned  # a pinned file keeps its own recipe
    checkpoint = network_checkpoint(NETWORK.build(), ObjectiveConfig(kind="flow"), SamplingConfig())
    del checkpoint["ditlab"]["dit_config"]["condition_options"]["encoder_options"]  # as an older ditlab wrote it
    assert recorded_recipe(upgrade_layout(checkpoint)["ditlab"]["dit_config"]) == asdict(FIRST_RECIPE)
    assert recorded_recipe(network_from_checkpoint(checkpoint).config.to_dict()) == asdict(FIRST_RECIPE)


def test_checkpoints_and_exports_record_the_recipe_they_were_trained_with(tmp_path):
    network = NETWORK.build()
    checkpoint = network_checkpoint(network, ObjectiveConfig(kind="flow"), SamplingConfig())
    assert recorded_recipe(checkpoint["ditlab"]["dit_config"]) == asdict(SceneCLIPRecipe())
    assert "encoder_options" not in NETWORK.condition_options  # recording does not change the live config
    other = replace(SceneCLIPRecipe(), steps=77)
    checkpoint["ditlab"]["dit_config"]["condition_options"]["encoder_options"] = {"recipe": asdict(other)}
    loaded = network_from_checkpoint(upgrade_layout(checkpoint))
    assert recorded_recipe(loaded.config.to_dict()) == asdict(other)
    path = save_safetensors(loaded, tmp_path / "dit.safetensors")
    assert recorded_recipe(json.loads(path.with_suffix(".json").read_text())["dit_config"]) == asdict(other)
    assert recorded_recipe(load_safetensors(path).config.to_dict()) == asdict(other)


class Built(Exception):
    """Raised by the stand-in scene CLIP with the recipe it was asked for (nothing is trained)."""


def test_a_loaded_network_encodes_captions_with_its_recorded_recipe(monkeypatch):
    def stand_in(cache_dir=None, recipe=None):
        raise Built(recipe)

    monkeypatch.setattr(view, "scene_clip", stand_in)
    old = network_from_checkpoint(upgrade_layout(_unpinned_checkpoint()))
    with pytest.raises(Built) as built:
        text_encoder_of(old.config)
    assert built.value.args[0] == FIRST_RECIPE
    with pytest.raises(Built) as built:
        text_encoder_of(NETWORK)  # a config naming no recipe reads with today's default
    assert built.value.args[0] == SceneCLIPRecipe()


def _unpinned_checkpoint() -> dict:
    checkpoint = network_checkpoint(NETWORK.build(), ObjectiveConfig(kind="flow"), SamplingConfig())
    del checkpoint["ditlab"]["dit_config"]["condition_options"]["encoder_options"]
    return checkpoint


def test_a_resumed_run_adopts_the_checkpoint_text_encoder(capsys):
    module = DiffusionModule(network=NETWORK, objective=ObjectiveConfig(kind="flow"), ema_decay=0.9)
    module.on_load_checkpoint(_unpinned_checkpoint())
    for network in (module.network, module.ema):
        assert network.config.condition_options["encoder_options"]["recipe"] == asdict(FIRST_RECIPE)
    assert "checkpoint's text encoder" in capsys.readouterr().out
    same = DiffusionModule(network=NETWORK, objective=ObjectiveConfig(kind="flow"), ema_decay=None)
    same.on_load_checkpoint(network_checkpoint(same.network, ObjectiveConfig(kind="flow"), SamplingConfig()))
    assert "checkpoint's text encoder" not in capsys.readouterr().out


def test_caption_features_encoded_with_another_recipe_are_refused_in_one_line():
    from ditlab.data.text_shards import check_network

    legacy = {"encoder": "scene-clip", "encoder_options": {}, "length": 32, "dim": 64, "pooled_dim": 64}
    with pytest.raises(ValueError, match=r"'scene-clip' \{'recipe.trunk': 'resnet10t'.* encoded by 'scene-clip' "
                                         r"\{'recipe.trunk': ''"):  # fmt: skip
        check_network(NETWORK, legacy, "shards")  # shards written before pins: the first recipe's features
    check_network(NETWORK, {**legacy, "encoder_options": pinned_text_options("scene-clip", {})}, "shards")
