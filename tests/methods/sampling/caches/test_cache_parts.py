"""The pieces behind the policies: TaylorSeer's forecast, calibration fits, counted FLOPs, the schedule-dependent
knob checks, the config round trip and ``DiffusionModule.sample`` with a cache (the options: test_cache_options)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from ditlab.diffusion.cache import cache_model_function
from ditlab.diffusion.config import CacheConfig, SamplingConfig
from ditlab.diffusion.sample import sample_images
from ditlab.methods.sampling.caches import build_policy, model_call_times
from ditlab.methods.sampling.caches.calibration import Calibration, calibrate
from ditlab.methods.sampling.caches.none import NoCache
from ditlab.methods.sampling.caches.taylorseer import TaylorSeer
from ditlab.methods.sampling.caches.work import Counted
from ditlab.models.taps import Branch

LABELS = torch.tensor([2, 7])


def forecast_errors(dit, order: int, degree: int) -> list[float]:
    """TaylorSeer computing at t = 900, 850, ... every 3rd call on a degree-``degree`` feature of t: the
    largest forecast error of each call in between, once enough calls were computed for every derivative."""
    schedule = torch.arange(900.0, 250.0, -50.0)
    policy = TaylorSeer(dit, schedule, interval=3, order=order, warmup=0)
    policy.reset()
    coefficients = torch.randn(degree + 1, 2, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def feature(t: float) -> torch.Tensor:
        return sum(c * (t / 1000) ** i for i, c in enumerate(coefficients))

    errors = []
    for call, t in enumerate(policy.times):
        policy.time = t
        branch = Branch(0, "mlp", lambda: None, lambda _, t=t: feature(t))
        if policy.full_call(call):
            assert torch.equal(policy.store(branch), feature(t))
        elif call > 3 * order:
            errors.append((policy.cached(branch) - feature(t)).abs().max().item())
    return errors


def test_taylor_forecast_is_exact_on_linear_features_and_higher_orders_help_on_curved_ones(dit):
    assert max(forecast_errors(dit, order=1, degree=1)) < 1e-12
    assert max(forecast_errors(dit, order=2, degree=1)) < 1e-12  # a zero second difference
    reuse, first, second = (max(forecast_errors(dit, order, degree=2)) for order in (0, 1, 2))
    assert second < first < reuse  # TaylorSeer's backward differences: better, not exact, on a quadratic


def test_teacache_fit_recovers_a_known_polynomial_and_magnitudes_start_at_one(dit, settings):
    x = torch.linspace(0.01, 0.5, 60, dtype=torch.float64)
    last = torch.tensor([0.6], dtype=torch.float64)  # the always-computed last call: an outlier left out of the fit
    calibration = Calibration(input_change=[x, last], output_change=[3 * x**2 - 0.5 * x + 0.02, 50 * last])
    np.testing.assert_allclose(calibration.coefficients(), [0, 0, 3, -0.5, 0.02], atol=1e-6)
    assert calibration.input_range() == (0.01, 0.5)
    objective, sampler = settings["ddim"]
    recorded = calibrate(dit, objective, model_call_times(objective, sampler, 6), num_samples=1, sampler=sampler,
                         steps=6, cfg_scale=2.0)  # fmt: skip
    magnitudes = recorded.magnitudes()
    assert len(magnitudes) == 6 and magnitudes[0] == 1.0 and all(m > 0 for m in magnitudes)
    assert len(recorded.input_change) == 5 and recorded.input_change[0].shape == (2,)  # cond and uncond rows


def test_built_policies_calibrate_themselves(dit, make_policy):
    assert len(make_policy(dit, {"policy": "magcache"}).magnitudes) == 8
    assert len(make_policy(dit, {"policy": "teacache", "options": {"threshold": 0.2}}).coefficients) == 5
    identity = make_policy(dit, {"policy": "teacache", "options": {"threshold": 0.0}})
    assert identity.coefficients is None  # the identity needs no polynomial


def test_counted_flops_follow_the_work_a_policy_skips(dit, make_policy, settings):
    objective, sampler = settings["ddim"]
    plain, reference, fora = Counted(dit), Counted(NoCache(dit, model_call_times(objective, sampler, 8))), None
    fora = Counted(make_policy(dit, {"policy": "fora", "options": {"interval": 4}}))
    for model in (plain, reference, fora):
        sample_images(model, objective, LABELS, steps=8, sampler=sampler, cfg_scale=2.0)
    assert plain.calls == fora.calls == 8
    assert reference.flops == plain.flops > 0
    blocks_share = fora.model.computed_share
    assert blocks_share == pytest.approx(3 / 8)  # FORA's plan over 8 calls: 0, 3 and 7
    assert blocks_share < fora.flops / plain.flops < blocks_share + 0.2  # gates, norms, embed and head remain


def test_sampling_config_round_trips_its_cache_and_the_module_samples_through_it(dit, settings):
    sampling = SamplingConfig(sampler="ddim", steps=6, cache=CacheConfig(policy="fora", options={"interval": 2}))
    assert SamplingConfig(**asdict(sampling)) == sampling  # what a checkpoint stores and reads back
    from ditlab.methods.base import DiffusionModule

    module = DiffusionModule(network=dit.config, sampling=sampling, ema_decay=None)
    module.network.load_state_dict(dit.state_dict())
    module.network.eval()
    cached = module.sample(LABELS, seed=1)
    objective = module.objective
    policy = build_policy(dit, sampling.cache, objective, "ddim", 6, sampling.cfg_scale)
    direct = sample_images(policy, objective, LABELS, seed=1, sampler="ddim", steps=6, cfg_scale=sampling.cfg_scale)
    assert torch.equal(cached, direct.clamp(-1, 1))
    plain = module.sample(LABELS, seed=1, cache=None)
    assert not torch.equal(cached, plain)
    assert cache_model_function(dit, objective, CacheConfig(), sampler="ddim", steps=6) is dit


@pytest.mark.parametrize("options, setting, message", [
    ({"policy": "fora", "options": {"interval": 9}}, "ddim", "cache.options.interval=9 does not fit"),
    ({"policy": "delta-dit", "options": {"blocks": 5}}, "ddim", "cache.options.blocks=5 does not fit"),
    ({"policy": "magcache", "options": {"magnitudes": [1.0, 1.0]}}, "ddim", "cache.options.magnitudes has 2 entries"),
    ({"policy": "taylorseer"}, "heun", "evaluates the network twice at the same time"),
])  # fmt: skip
def test_knobs_that_do_not_fit_the_network_or_sampler_are_refused(dit, options, setting, message):
    from ditlab.diffusion import FlowMatching

    objective, sampler = (FlowMatching(), "heun") if setting == "heun" else (None, None)
    if objective is None:
        from ditlab.diffusion import GaussianDiffusion

        objective, sampler = GaussianDiffusion(), "ddim"
    with pytest.raises(ValueError, match=message):
        build_policy(dit, options, objective, sampler, 8)


def test_a_policy_refuses_more_calls_than_it_was_planned_for(dit, make_policy, settings):
    objective, sampler = settings["ddim"]
    policy = make_policy(dit, {"policy": "fora", "options": {"interval": 2}}, steps=4)
    with pytest.raises(ValueError, match="planned for 4 model calls"):
        sample_images(policy, objective, LABELS, steps=5, sampler=sampler)


def test_heun_is_served_by_policies_that_do_not_forecast_in_time(dit):
    from ditlab.diffusion import FlowMatching

    objective = FlowMatching(t_scale=1000.0)
    policy = build_policy(dit, {"policy": "fora", "options": {"interval": 2}}, objective, "heun", 4, 2.0)
    assert policy.num_calls == len(model_call_times(objective, "heun", 4)) > 4
    out = sample_images(policy, objective, LABELS, steps=4, sampler="heun", cfg_scale=2.0)
    assert torch.isfinite(out).all()
