"""``sampling.cache`` is ``{policy, options}``: each policy's options dataclass refuses a bad and a foreign knob in
one line when the config is made, the flat form written before (configs, checkpoint entries, pickles) converts
to the same policy and samples the same, and a policy registered from outside ditlab is selectable."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from ditlab.diffusion import GaussianDiffusion
from ditlab.diffusion.cache import CACHE_POLICIES, CacheConfig, cache_model_function
from ditlab.diffusion.config import SamplingConfig
from ditlab.diffusion.sample import sample_images
from ditlab.methods.sampling.caches import build_policy

OLD_FLAT = {"policy": "fora", "interval": 2, "threshold": None, "blocks": None, "boundary": None, "order": None,
            "max_skip": None, "warmup": None, "ratio": None, "coefficients": None, "magnitudes": None, "path": None}
"""``asdict`` of a ``CacheConfig`` written before policies owned their knobs."""

BAD = {
    "fora": ({"interval": 0}, "cache.options.interval=0 is out of range for the fora policy; it must be >= 1"),
    "delta-dit": ({"boundary": 1.5}, "cache.options.boundary=1.5 is out of range for the delta-dit policy; "
                                     "it must be in [0.0, 1.0]"),
    "teacache": ({"threshold": -0.1}, "cache.options.threshold=-0.1 is out of range for the teacache policy"),
    "taylorseer": ({"order": 2.5}, "cache.options.order=2.5 must be a whole number for the taylorseer policy"),
    "magcache": ({"max_skip": 0}, "cache.options.max_skip=0 is out of range for the magcache policy"),
    "toca": ({"ratio": -0.1}, "cache.options.ratio=-0.1 is out of range for the toca policy"),
    "plan": ({"path": 3}, "cache.options.path=3 must be a string for the plan policy"),
}  # fmt: skip
FOREIGN = {"fora": "threshold", "delta-dit": "order", "teacache": "interval", "taylorseer": "ratio",
           "magcache": "interval", "toca": "threshold", "plan": "interval"}  # another policy's knob


def test_every_registered_policy_has_a_bad_knob_case():
    assert set(BAD) == set(CACHE_POLICIES) - {"none"}


@pytest.mark.parametrize("policy", sorted(BAD))
def test_each_policy_refuses_a_bad_and_a_foreign_knob_in_one_line(policy):
    options, message = BAD[policy]
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as raised:
        CacheConfig(policy, options)
    assert "\n" not in str(raised.value)
    foreign = FOREIGN[policy]
    with pytest.raises(ValueError, match=f"cache.options.{foreign} is not a knob of the {policy} policy") as raised:
        CacheConfig(policy, {foreign: 1})
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match=f"is not a knob of the {policy} policy"):  # the old flat spelling too
        SamplingConfig(cache={"policy": policy, foreign: 1})


def test_none_and_unknown_policies():
    with pytest.raises(ValueError, match=r"cache.options.interval is not a knob of the none policy \(its knobs: none"):
        CacheConfig("none", {"interval": 2})
    with pytest.raises(ValueError, match="unknown cache policy 'lru' .*registered: .*'fora'"):
        CacheConfig("lru")


def test_knobs_left_out_or_null_take_the_policys_defaults():
    assert CacheConfig("fora").options == {} and CacheConfig("fora", {"interval": None}).options == {}
    assert CacheConfig("fora", {"interval": 2.0}).options == {"interval": 2}
    assert CacheConfig("magcache").settings().threshold == 0.06


def test_the_old_flat_form_converts_to_the_same_policy_and_samples_the_same(dit, settings):
    """The old form keeps the plan it sampled with (fora's ``align: start``), not the paper's that new configs get."""
    new = CacheConfig("fora", {"interval": 2, "align": "start"})
    sampling = SamplingConfig(sampler="ddim", steps=6, cache=new)
    assert SamplingConfig(**{**asdict(sampling), "cache": OLD_FLAT}) == sampling  # an old checkpoint's entry
    assert SamplingConfig(cache={"policy": "fora", "interval": 2}).cache == new  # an old config
    objective, sampler = settings["ddim"]
    labels = torch.tensor([1, 6])
    old_images = sample_images(build_policy(dit, OLD_FLAT, objective, sampler, 6, 2.0), objective, labels,
                               sampler=sampler, steps=6, cfg_scale=2.0, seed=3)  # fmt: skip
    new_images = sample_images(build_policy(dit, new, objective, sampler, 6, 2.0), objective, labels,
                               sampler=sampler, steps=6, cfg_scale=2.0, seed=3)  # fmt: skip
    assert torch.equal(old_images, new_images)


def test_an_old_pickled_cache_config_loads_as_the_new_form(tmp_path, monkeypatch):
    """Lightning's hyper_parameters held the old ``ditlab.diffusion.config.CacheConfig``, every knob a field."""
    import ditlab.diffusion.config as config
    from ditlab.models.loading import load_plain

    class CacheConfigBefore:
        pass

    CacheConfigBefore.__module__, CacheConfigBefore.__qualname__ = "ditlab.diffusion.config", "CacheConfig"
    old = CacheConfigBefore()
    old.__dict__.update(OLD_FLAT)
    with monkeypatch.context() as patch:
        patch.setattr(config, "CacheConfig", CacheConfigBefore)
        torch.save({"hyper_parameters": {"cache": old}}, tmp_path / "old.ckpt")
    loaded = load_plain(tmp_path / "old.ckpt", "old checkpoint")["hyper_parameters"]["cache"]
    assert type(loaded) is CacheConfig
    assert vars(loaded) == {"policy": "fora", "options": {"interval": 2, "align": "start"}}


def test_a_policy_registered_outside_ditlab_is_selectable(scaled_policy, dit):
    sampling = SamplingConfig(sampler="ddim", steps=4, cache={"policy": "test-scaled", "options": {"gain": 0.5}})
    model = cache_model_function(dit, GaussianDiffusion(learn_sigma=True), sampling.cache, sampler="ddim", steps=4)
    assert isinstance(model, scaled_policy) and model.gain == 0.5
    with pytest.raises(ValueError, match=r"cache.options.gain=3 is out of range for the test-scaled policy"):
        CacheConfig("test-scaled", {"gain": 3})
    assert cache_model_function(dit, None, CacheConfig(), sampler="ddim", steps=4) is dit


@pytest.mark.parametrize(("text", "options"), [
    ("sampling: {cache: {policy: fora, options: {interval: 2}}}", {"interval": 2}),
    ("sampling: {cache: {policy: fora, interval: 2}}", {"interval": 2, "align": "start"})])  # fmt: skip
def test_a_config_file_reads_the_new_and_the_old_flat_form(text, options):
    """What LightningCLI does with ``model.init_args.sampling`` in a config written before or after."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SamplingConfig, "sampling")
    assert parser.instantiate(parser.parse_string(text)).sampling.cache == CacheConfig("fora", options)
