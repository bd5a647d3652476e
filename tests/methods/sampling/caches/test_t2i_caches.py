"""Every cache policy at a real (non-identity) setting on text-to-image networks (PixArt and MM-DiT blocks, captions
encoded by the ``random-words`` encoder): finite samples that differ from the uncached ones while computing less; the
streams of an MM-DiT cached alike; TeaCache / MagCache reading the image stream as TeaCache4FLUX / MagCache4FLUX do;
ToCa refreshing PixArt's cross-attention and each MM-DiT stream token-wise; Delta-DiT's front/rear block ranges; the
calibration and the redundancy probe conditioned on validation captions. (The identity settings are bit-exact on
these networks: ``test_conformance_matrix.py``.)"""

from __future__ import annotations

import pytest
import torch

from ditlab.diffusion.cache import cache_policies
from ditlab.diffusion.gaussian import GaussianDiffusion
from ditlab.diffusion.sample import model_call_times, sample_images
from ditlab.methods.sampling.caches import build_policy
from ditlab.methods.sampling.caches.calibration import (
    block0_modulated_input,
    calibrate,
    calibration_conditions,
)
from ditlab.methods.sampling.caches.plan import StaticPlan
from ditlab.methods.sampling.caches.redundancy import redundancy_profile
from ditlab.metrics.text_eval import sample_conditions
from ditlab.models.blocks.mmdit import modulate
from ditlab.models.text.features import TextFeatures
from ditlab.models.text.prompts import condition_input

OBJECTIVE, SAMPLER, STEPS, CFG = GaussianDiffusion(learn_sigma=True), "ddim", 8, 2.0
KINDS = ("pixart", "mmdit")
REAL = {
    "fora": {"interval": 2},
    "delta-dit": {"interval": 2, "blocks": 2},
    "teacache": {"threshold": 0.5},
    "taylorseer": {"interval": 3, "order": 1, "warmup": 1},
    "magcache": {"threshold": 0.2, "max_skip": 2},
    "toca": {"interval": 3, "ratio": 0.25},
    "plan": "attention-reused",
}
"""A real setting of each built-in policy (``plan``: every attention unit reused after the first call)."""


@pytest.fixture(scope="module")
def networks(text_network) -> dict:
    """Per kind: the network, its encoded validation captions and its uncached samples."""
    built = {}
    for kind in KINDS:
        network = text_network(kind)
        captions = condition_input(network.config, sample_conditions(network.config, 3))
        built[kind] = network, captions, sample(network, captions)
    return built


def sample(model, captions: TextFeatures) -> torch.Tensor:
    return sample_images(model, OBJECTIVE, captions, seed=5, sampler=SAMPLER, steps=STEPS, cfg_scale=CFG)


def cache_of(policy: str, network, tmp_path) -> dict:
    options = REAL[policy]
    if options == "attention-reused":
        times = model_call_times(OBJECTIVE, SAMPLER, STEPS).tolist()
        kinds = [unit.kind for unit in network.units()]
        table = [[True] * len(kinds)] + [[kind != "attention" for kind in kinds]] * (len(times) - 1)
        options = {"path": str(StaticPlan(table, times, SAMPLER, STEPS, network.depth).save(tmp_path / "plan.json"))}
    return {"policy": policy, "options": options}


def test_every_builtin_policy_has_a_real_setting():
    built_in = {name for name, entry in cache_policies().items() if entry.options.__module__.startswith("ditlab.")}
    assert built_in - {"none"} == set(REAL), "declare a real setting of a new policy in REAL"


@pytest.mark.parametrize("policy", sorted(REAL))
@pytest.mark.parametrize("kind", KINDS)
def test_a_real_setting_samples_finite_images_that_differ_while_computing_less(networks, kind, policy, tmp_path):
    network, captions, plain = networks[kind]
    model = build_policy(network, cache_of(policy, network, tmp_path), OBJECTIVE, SAMPLER, STEPS, cfg_scale=CFG)
    cached = sample(model, captions)
    assert torch.isfinite(cached).all()
    assert not torch.allclose(cached, plain, atol=1e-4), f"{policy} on {kind} sampled the uncached images"
    assert model.computed_share < 1.0, f"{policy} on {kind}: {model.computed_share}"


def test_teacache_reads_the_image_streams_modulated_input_of_the_first_mmdit_block(networks):
    """TeaCache4FLUX: ``transformer_blocks[0].norm1(img, temb)``, the text rows left out."""
    network, captions, _ = networks["mmdit"]
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((3,), 500.0)
    tokens, cond = network.embed(x, t, captions)
    block = network.blocks[0]
    shift, scale = block.adaLN_modulation(cond.vector).chunk(6, dim=1)[:2]
    image = tokens[:, -network.x_embedder.num_patches :]
    expected = modulate(block.norm1(image), shift, scale)
    assert torch.equal(block0_modulated_input(network, tokens, cond), expected)
    pixart, pixart_captions, _ = networks["pixart"]
    tokens, cond = pixart.embed(x, t, pixart_captions)
    assert block0_modulated_input(pixart, tokens, cond).shape == tokens.shape  # no text stream: every token


def test_magcache_calibrates_the_image_rows_of_the_residual(networks, monkeypatch):
    """MagCache4FLUX's ratio is that of the image residual; the calibration samples validation captions."""
    network, _, _ = networks["mmdit"]
    seen = []
    run = network.run_trunk

    def record(tokens, cond, t, branches=None):
        out = run(tokens, cond, t, branches=branches)
        seen.append((tokens, out))
        return out

    monkeypatch.setattr(network, "run_trunk", record)
    schedule = model_call_times(OBJECTIVE, SAMPLER, 4)
    recorded = calibrate(network, OBJECTIVE, schedule, num_samples=2, sampler=SAMPLER, steps=4, cfg_scale=CFG)
    norms = [(out - tokens)[:, -network.x_embedder.num_patches :].norm(dim=-1) for tokens, out in seen]
    expected = (norms[1] / norms[0]).mean(1)
    torch.testing.assert_close(recorded.magnitude_ratio[0], expected)
    assert len(recorded.input_change) == 3 and all(torch.isfinite(c).all() for c in recorded.input_change)


def test_calibration_conditions_are_encoded_validation_captions_or_refused_in_one_line(networks):
    network, _, _ = networks["pixart"]
    conditions = calibration_conditions(network, 4)
    assert isinstance(conditions, TextFeatures) and len(conditions) == 4 and conditions.null is not None
    options = {k: v for k, v in network.config.condition_options.items() if k not in ("encoder", "encoder_options")}
    unnamed = network.config.replace(condition_options=options).build().eval()
    with pytest.raises(ValueError, match="calibrating a cache on this text-conditioned network") as error:
        build_policy(unnamed, {"policy": "teacache", "options": {"threshold": 0.5}}, OBJECTIVE, SAMPLER, STEPS,
                     cfg_scale=CFG)  # fmt: skip
    assert "\n" not in str(error.value)


def test_a_cached_mmdit_unit_holds_both_streams_of_one_call(networks):
    """FORA's entries on MM-DiT cover ``[text; image]`` (the context-pre-only last block: the image rows), so a reused
    call reuses text and image outputs computed together."""
    network, captions, _ = networks["mmdit"]
    model = build_policy(network, {"policy": "fora", "options": {"interval": 2}}, OBJECTIVE, SAMPLER, STEPS,
                         cfg_scale=CFG)  # fmt: skip
    sample(model, captions)
    length, image = captions.tokens.shape[1], network.x_embedder.num_patches
    widths = {unit.index: model.kept[unit.index][0].shape[1] for unit in network.units()}
    last = [unit.index for unit in network.units() if unit.block == network.depth - 1]
    assert all(width == length + image for index, width in widths.items() if index not in last)
    assert all(widths[index] == image for index in last)


def test_toca_refreshes_each_mmdit_stream_through_its_own_mlp(networks, monkeypatch):
    network, captions, _ = networks["mmdit"]
    block = network.blocks[1]
    sizes = {"text": [], "image": []}
    for stream, mlp in (("text", block.context_mlp), ("image", block.mlp)):
        forward = mlp.forward
        monkeypatch.setattr(mlp, "forward", lambda tokens, forward=forward, stream=stream:
                            sizes[stream].append(tokens.shape[1]) or forward(tokens))  # fmt: skip
    model = build_policy(network, {"policy": "toca", "options": {"interval": 3, "ratio": 0.25}}, OBJECTIVE, SAMPLER,
                         STEPS, cfg_scale=CFG)  # fmt: skip
    sample(model, captions)
    length, image = captions.tokens.shape[1], network.x_embedder.num_patches
    assert set(sizes["text"]) == {length, round(0.25 * length)}  # full calls: all tokens; cached ones: a quarter
    assert set(sizes["image"]) == {image, round(0.25 * image)}
    assert sizes["text"].count(length) == sizes["image"].count(image)  # the same calls compute both in full


def test_toca_refreshes_pixart_cross_attention_token_wise(networks, monkeypatch):
    network, captions, _ = networks["pixart"]
    attention = network.blocks[2].cross_attn
    queries = []
    forward = attention.forward
    monkeypatch.setattr(attention, "forward", lambda tokens, *rest: queries.append(tokens.shape[1]) or
                        forward(tokens, *rest))  # fmt: skip
    model = build_policy(network, {"policy": "toca", "options": {"interval": 3, "ratio": 0.25}}, OBJECTIVE, SAMPLER,
                         STEPS, cfg_scale=CFG)  # fmt: skip
    sample(model, captions)
    image = network.x_embedder.num_patches
    assert set(queries) == {image, round(0.25 * image)}


@pytest.mark.parametrize("kind", KINDS)
def test_delta_dit_caches_the_rear_blocks_early_and_the_front_blocks_late(networks, kind, monkeypatch):
    """8 calls, interval 2, ranges of 2 of 4 blocks: calls 1 and 3 skip blocks 2-3, calls 5 and 7 blocks 0-1."""
    network, captions, _ = networks[kind]
    model = build_policy(network, {"policy": "delta-dit", "options": {"interval": 2, "blocks": 2}}, OBJECTIVE,
                         SAMPLER, STEPS, cfg_scale=CFG)  # fmt: skip
    ran = []
    for index, block in enumerate(network.blocks):
        forward = block.forward
        monkeypatch.setattr(block, "forward", lambda *args, index=index, forward=forward, **kwargs:
                            ran.append((model.call, index)) or forward(*args, **kwargs))  # fmt: skip
    sample(model, captions)
    skipped = {call: sorted(set(range(4)) - {i for c, i in ran if c == call}) for call in range(STEPS)}
    assert skipped == {0: [], 1: [2, 3], 2: [], 3: [2, 3], 4: [], 5: [0, 1], 6: [], 7: [0, 1]}
    assert model.computed_share == pytest.approx(0.75)


@pytest.mark.parametrize("kind", KINDS)
def test_the_redundancy_probe_runs_on_captions_and_sees_the_text_blocks_units(networks, kind):
    network, _, _ = networks[kind]
    profile = redundancy_profile(network, OBJECTIVE, SAMPLER, steps=4, cfg_scale=CFG, num_samples=2)
    units = set(profile["units"])
    assert {"key", "value", "attention", "mlp", "block"} <= units
    assert ("cross_attention" in units) == (kind == "pixart")
    table = profile["units"]["attention"]["cond"]["relative"]["mean"]
    assert len(table) == network.depth and all(value >= 0 for row in table for value in row)
