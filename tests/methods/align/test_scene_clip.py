"""The scene CLIP: a tiny recipe trains deterministically and its loss falls, the cache is reused, and its views
(alignment encoder, text-encoder kind, FID features, CLIP score) hand out what their slots promise."""

from __future__ import annotations

import pytest
import torch

import ditlab.metrics.scene_clip as scene_clip_module
from ditlab.methods.align.encoders import encoder_info, load_encoder
from ditlab.methods.align.encoders.scene_clip import SceneCLIPEncoder, SceneCLIPText
from ditlab.metrics.scene_clip import (
    SceneCLIPFeatures,
    SceneCLIPRecipe,
    digit_presence_targets,
    hard_negative,
    patch_digit_targets,
    scene_clip,
    scene_clip_path,
    train_scene_clip,
)

TINY = SceneCLIPRecipe(width=32, layers=2, head_width=16, text_width=32, text_layers=1, text_heads=2, embed_dim=16,
                       steps=24, batch_size=32, lr=3e-3, holdout=64)  # fmt: skip
CAPTIONS = ["a small red 3 on a black background", "a large blue 7 left of a small white 1 on a grey background", ""]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny recipe trained once into a fresh cache folder: ``(model, cache folder)``."""
    folder = tmp_path_factory.mktemp("cache")
    return scene_clip(folder, TINY), folder


def test_tiny_recipe_trains_and_its_loss_falls(tiny):
    model, _ = tiny
    scores = model.scores
    assert scores["last_loss"] < scores["first_loss"] - 0.3, scores
    assert scores["image_to_text_top5"] > 5 / 64 and model.train_seconds > 0  # better than chance among 64
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_hard_negatives_change_one_attribute():
    from ditlab.data.scene_grammar import parse_caption
    from ditlab.data.scenes import DigitScenes

    generator = torch.Generator().manual_seed(0)
    for attributes in DigitScenes("train", length=40).attributes(range(40)):
        negative = parse_caption(hard_negative(attributes, generator))
        truth = attributes.described()
        changed = [negative.digits != truth.digits, negative.colours != truth.colours,
                   negative.sizes != truth.sizes, negative.relation != truth.relation]  # fmt: skip
        assert sum(changed) == 1 and negative.background == truth.background


def test_patch_targets_follow_the_layout_and_the_dense_loss_trains_the_head():
    from dataclasses import replace

    from ditlab.data.scene_grammar import SceneAttributes
    from ditlab.data.scenes import DigitScenes
    from ditlab.metrics.scene_clip import SceneCLIP, grammar_vocabulary
    from ditlab.models.text.tokenizer import Tokenizer

    # a large 7 centred at (8, 8) px covers the 14x14 box 1..15: patch centres 2, 6, 10, 14 on a 4-px grid
    scene = SceneAttributes([7, 2], ["red", "blue"], ["large", "small"], [(0.25, 0.25), (0.75, 0.75)], "above")
    targets = patch_digit_targets([scene], grid=8, image_size=32).reshape(8, 8)
    assert (targets[:4, :4] == 7).all() and (targets[4:, :4] == 10).all() and (targets[:4, 4:] == 10).all()
    assert (targets[5:7, 5:7] == 2).all() and targets[4, 4] == targets[7, 7] == 10  # small: box 19..29 (centres 22, 26)
    assert targets.unique().tolist() == [2, 7, 10]
    # real scenes: every digit owns at least one patch
    for attributes in DigitScenes("train", length=20).attributes(range(20)):
        assert set(attributes.digits) <= set(patch_digit_targets([attributes], 8, 32).unique().tolist())
    # off at 0 (the head is not built and the recipe is its own); on, the head trains on the dense loss
    off = replace(TINY, patch_digits=0.0)
    assert SceneCLIP(off, grammar_vocabulary(Tokenizer(TINY.context_length))).digit_head is None
    assert scene_clip_path(recipe=replace(TINY, patch_digits=1.0)) != scene_clip_path(recipe=off)
    torch.manual_seed(0)
    model = SceneCLIP(replace(TINY, patch_digits=1.0), grammar_vocabulary(Tokenizer(TINY.context_length)))
    scenes = DigitScenes("train", length=8)
    images = scenes.images(range(8))
    captions, dense = scenes.captions(range(8)), patch_digit_targets(scenes.attributes(range(8)), model.grid, 32)
    with_dense, without = model.loss(images, captions, [], dense), model.loss(images, captions)
    assert with_dense > without  # cross-entropy over 11 classes adds about log(11)
    with_dense.backward()
    assert model.digit_head.weight.grad.abs().sum() > 0


def test_cache_is_reused_and_training_is_deterministic(tiny, monkeypatch):
    model, folder = tiny
    assert len(list(folder.glob("scene-clip-*.pt"))) == 1
    monkeypatch.setattr(scene_clip_module, "train_scene_clip", lambda recipe: pytest.fail("retrained"))
    again = scene_clip(folder, TINY)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert again.fingerprint == model.fingerprint and again.scores == model.scores
    monkeypatch.undo()
    rng = torch.get_rng_state()
    rebuilt, _ = train_scene_clip(TINY)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))


def test_alignment_encoder_view(tiny):
    model, _ = tiny
    encoder = SceneCLIPEncoder(model)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    output = encoder(images, grid=8, attention=[1])
    assert output.features.shape == (2, 64, 32) and output.class_token.shape == (2, 32)
    assert output.attention[1].shape == (2, 2, 64, 64)
    torch.testing.assert_close(output.attention[1].sum(-1), torch.ones(2, 2, 64))
    assert encoder(torch.nn.functional.interpolate(images, size=64), grid=4).features.shape == (2, 16, 32)
    with pytest.raises(ValueError, match="pixels"):
        encoder(torch.zeros(2, 1, 32, 32), grid=8)
    assert encoder_info("scene-clip").feature_dim == SceneCLIPRecipe().width


def test_load_encoder_names_scene_clip(tiny, monkeypatch):
    import ditlab.methods.align.encoders.scene_clip as view

    monkeypatch.setattr(view, "scene_clip", lambda cache_dir=None, recipe=None: tiny[0])
    assert isinstance(load_encoder("scene-clip"), SceneCLIPEncoder)


def test_text_encoder_kind(tiny, monkeypatch):
    import ditlab.methods.align.encoders.scene_clip as view
    from ditlab.models.text import build_text_encoder

    monkeypatch.setattr(view, "scene_clip", lambda cache_dir=None, recipe=None: tiny[0])
    encoder = build_text_encoder("scene-clip")
    assert isinstance(encoder, SceneCLIPText)
    features = encoder(CAPTIONS)
    assert features.tokens.shape == (3, 32, 32) and features.pooled.shape == (3, 16)
    assert features.mask.sum(1).tolist()[2] == 2  # the null caption: start and end of text
    torch.testing.assert_close(torch.nn.functional.normalize(features.pooled, dim=-1),
                               tiny[0].encode_captions(CAPTIONS))  # fmt: skip
    off_grammar = encoder(["a photo of a cat"])  # unknown words still encode (as the unknown token)
    assert torch.isfinite(off_grammar.tokens).all()


def test_fid_features_and_clip_score(tiny, monkeypatch):
    from ditlab.data.scenes import DigitScenes
    from ditlab.metrics import reference, text_eval

    model, _ = tiny
    scenes = DigitScenes("validation", length=16)
    images, captions = scenes.images(range(16)), scenes.captions(range(16))
    features, logits = SceneCLIPFeatures(model).features_and_logits(images)
    assert features.shape == (16, 16) and logits.shape == (16, 0)
    monkeypatch.setattr(reference, "SCENES_REFERENCE", 32)
    stats = reference.reference_stats("scenes", SceneCLIPFeatures(model), image_size=32, cache_dir=tiny[1])
    assert stats.name == "scenes" and stats.mu.shape == (16,) and stats.num_samples == 32
    assert len(list(tiny[1].glob("reference-digit-scenes-v1-32-scene-clip-*.pt"))) == 1
    monkeypatch.setattr(text_eval, "_scene_clip", lambda cache_dir: model)
    real = text_eval.clip_score_of(images, captions)
    assert real["clip_features"] == "scene-clip" and 0 <= real["clip_score"] <= 100
    assert real["clip_score"] > text_eval.clip_score_of(images, captions[1:] + captions[:1])["clip_score"]


@pytest.mark.parametrize("layers, field", [(2, 7), (3, 9), (4, 13), (5, 15)])
def test_convolutional_stem_downsamples_4x_and_deeper_stems_see_a_whole_glyph(layers, field):
    from ditlab.metrics.scene_clip import convolutional_stem

    for norm, kind in (("group", torch.nn.GroupNorm), ("batch", torch.nn.BatchNorm2d)):
        normalised = convolutional_stem(8, 16, layers, norm=norm)
        assert sum(isinstance(m, kind) for m in normalised) == layers - 1  # none after the last one
        assert normalised(torch.randn(2, 3, 32, 32)).shape == (2, 16, 8, 8)
    stem = convolutional_stem(8, 16, layers)  # without GroupNorm's image-wide statistics, the field is local
    image = torch.randn(1, 3, 32, 32, requires_grad=True)
    out = stem(image)
    assert out.shape == (1, 16, 8, 8)
    out[0, :, 4, 4].sum().backward()  # the receptive field of one token: the input pixels its gradient reaches
    rows = image.grad[0].abs().sum((0, 2)).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == field
    with pytest.raises(ValueError, match="stem_layers"):
        convolutional_stem(8, 16, 1)
    with pytest.raises(ValueError, match="stem_norm must be one of none, group, batch"):
        convolutional_stem(8, 16, 2, norm="layer")


def test_options_at_their_earlier_values_keep_the_cache_name_of_the_recipe_before_them():
    from dataclasses import asdict, replace

    from ditlab.metrics.features import recipe_digest
    from ditlab.metrics.scene_clip import FIRST_RECIPE, OPTIONS_ADDED_LATER

    earlier = {k: v for k, v in asdict(FIRST_RECIPE).items() if k not in OPTIONS_ADDED_LATER}
    assert FIRST_RECIPE.digest("scenes") == recipe_digest(earlier, dataset="scenes")
    for change in ({"stem_layers": 4}, {"stem_norm": "group"}, {"digit_presence": 1.0}, {"trunk": "resnet10t"}):
        assert replace(FIRST_RECIPE, **change).digest("scenes") != FIRST_RECIPE.digest("scenes")
    assert SceneCLIPRecipe().digest("scenes") != FIRST_RECIPE.digest("scenes")


def test_digit_presence_marks_each_digit_once_and_its_loss_trains_the_head_from_the_embedding():
    from dataclasses import replace

    from ditlab.data.scene_grammar import SceneAttributes
    from ditlab.data.scenes import DigitScenes
    from ditlab.metrics.scene_clip import SceneCLIP, grammar_vocabulary
    from ditlab.models.text.tokenizer import Tokenizer

    scenes = [SceneAttributes([3, 3], ["red", "blue"], ["large", "small"], relation="above"),
              SceneAttributes([0, 9, 4], ["red", "blue", "white"], ["large", "small", "small"])]  # fmt: skip
    targets = digit_presence_targets(scenes)
    assert targets.shape == (2, 10) and targets[0].nonzero().flatten().tolist() == [3]
    assert targets[1].nonzero().flatten().tolist() == [0, 4, 9] and targets.sum() == 4
    vocabulary = grammar_vocabulary(Tokenizer(TINY.context_length))
    assert SceneCLIP(replace(TINY, digit_presence=0.0), vocabulary).presence_head is None
    torch.manual_seed(0)
    model = SceneCLIP(replace(TINY, digit_presence=1.0), vocabulary)
    data = DigitScenes("train", length=8)
    images, captions = data.images(range(8)), data.captions(range(8))
    presence = digit_presence_targets(data.attributes(range(8)))
    with_presence, without = model.loss(images, captions, presence=presence), model.loss(images, captions)
    assert with_presence > without + 0.3  # binary cross-entropy near log(2) per digit at initialisation
    with_presence.backward()
    assert model.presence_head.weight.grad.abs().sum() > 0
    assert model.clip.visual.proj.grad.abs().sum() > 0  # the loss reaches the tower through the embedding


def test_a_timm_trunk_replaces_the_stem_and_keeps_the_8x8_token_grid():
    from dataclasses import replace

    from ditlab.metrics.scene_clip import CNNTrunk, SceneCLIP, grammar_vocabulary
    from ditlab.models.text.tokenizer import Tokenizer

    recipe = replace(TINY, trunk="resnet10t", pool="avg")
    model = SceneCLIP(recipe, grammar_vocabulary(Tokenizer(recipe.context_length)))
    assert isinstance(model.clip.visual.conv1, CNNTrunk)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.clip.visual.conv1.modules())
    embedding, tokens = model.image_tokens(torch.randn(3, 3, 32, 32))
    assert embedding.shape == (3, recipe.embed_dim) and tokens.shape == (3, 64, recipe.width)
    stem = replace(TINY, trunk="")
    assert scene_clip_path(recipe=recipe) != scene_clip_path(recipe=replace(stem, pool="avg")) != scene_clip_path(recipe=stem)
    with pytest.raises(ValueError, match="not a timm model name"):
        SceneCLIP(replace(TINY, trunk="no-such-net"), grammar_vocabulary(Tokenizer(TINY.context_length)))
    with pytest.raises(ValueError, match="pool must be tok"):
        replace(TINY, pool="max")


def test_scene_clip_first_features_measure_on_the_first_recipe(tiny, monkeypatch):
    from ditlab.metrics.features import feature_extractor
    from ditlab.metrics.scene_clip import FIRST_RECIPE

    asked = []
    monkeypatch.setattr(scene_clip_module, "scene_clip", lambda cache_dir, recipe: asked.append(recipe) or tiny[0])
    first, default = feature_extractor("scene-clip-first"), feature_extractor("scene-clip")
    assert asked == [FIRST_RECIPE, SceneCLIPRecipe()]  # a separately trained network, not the default's
    assert (first.name, default.name) == ("scene-clip-first", "scene-clip")
