"""The papers' knob values give the papers' plans: full calls recorded from the public reference code.

Recorded by running, on the setups below, TaylorSeer's ``cal_type`` (Shenyi-Z/TaylorSeer 288776d,
``TaylorSeer-DiT/cache_functions/cal_type.py``, steps counted down as its sampler does), FORA's
``boost_infer_static`` test (prathebaselva/FORA acde628, ``src/models.py``: ``step == numstep - 1 or step % N == 0``
over the counted-down steps) and MagCache's skip rule (Zehong-Ma/MagCache df81cb1, ``MagCache4FLUX/magcache_flux.py``
without its FLUX-only forced step, retention ratio 0.2). Each list is the model calls (0 = first) that compute.
"""

from __future__ import annotations

import pytest
import torch

from ditlab.diffusion.cache import as_cache_config
from ditlab.methods.sampling.caches.fora import Fora
from ditlab.methods.sampling.caches.magcache import MagCache
from ditlab.methods.sampling.caches.taylorseer import TaylorSeer

TAYLORSEER = {  # (calls, interval, first_enhance) -> full calls
    (10, 4, 2): [0, 1, 5, 9],
    (12, 3, 2): [0, 1, 4, 7, 10],
    (8, 3, 1): [0, 3, 6],
    (9, 2, 3): [0, 1, 2, 4, 6, 8],
    (50, 5, 2): [0, 1, 6, 11, 16, 21, 26, 31, 36, 41, 46],
}
FORA = {  # (calls, interval) -> full calls
    (10, 3): [0, 3, 6, 9],
    (8, 2): [0, 1, 3, 5, 7],
    (5, 2): [0, 2, 4],
    (7, 4): [0, 2, 6],
    (50, 3): [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 37, 40, 43, 46, 49],
}
RATIOS = [1.0, 1.0, 0.99, 0.98, 0.97, 0.98, 0.96, 0.95, 0.9, 1.05]
EXACT = [1.0, 1.0, 0.75, 1.0, 0.5, 1.0, 1.0, 0.75]  # errors land exactly on the threshold: < and <= differ
MAGCACHE = {  # (ratios, threshold, K) -> full calls
    ("ratios", 0.02, 2): [0, 1, 3, 4, 5, 6, 7, 8, 9],
    ("ratios", 0.05, 2): [0, 1, 4, 6, 7, 8, 9],
    ("ratios", 0.03, 3): [0, 1, 3, 4, 6, 7, 8, 9],
    ("ratios", 0.01, 1): list(range(10)),
    ("exact", 0.25, 2): [0, 3, 4, 7],
    ("exact", 0.25, 1): [0, 2, 4, 6],
    ("exact", 0.5, 3): [0, 4],
}


def schedule(calls: int) -> torch.Tensor:
    return torch.linspace(999.0, 0.0, calls)


def branch_plan(policy) -> list[int]:
    return [call for call in range(policy.num_calls) if policy.full_call(call)]


def magcache_plan(policy: MagCache) -> list[int]:
    policy.reset()
    full = []
    for call in range(policy.num_calls):
        if not policy.reuse(call):
            full.append(call)
            policy.residual = torch.zeros(())
    return full


@pytest.mark.parametrize("setup", list(TAYLORSEER))
def test_taylorseer_warmup_counts_the_interval_from_the_last_warmup_call(dit, setup):
    calls, interval, warmup = setup
    assert branch_plan(TaylorSeer(dit, schedule(calls), interval=interval, warmup=warmup)) == TAYLORSEER[setup]


@pytest.mark.parametrize("setup", list(FORA))
def test_fora_aligns_full_calls_with_the_end(dit, setup):
    calls, interval = setup
    assert branch_plan(Fora(dit, schedule(calls), interval=interval)) == FORA[setup]


@pytest.mark.parametrize("setup", list(MAGCACHE))
def test_magcache_reuses_while_the_error_is_at_most_the_threshold(dit, setup):
    name, threshold, max_skip = setup
    ratios = RATIOS if name == "ratios" else EXACT
    warmup = int(0.2 * len(ratios))  # the reference's int(num_steps * retention_ratio)
    policy = MagCache(dit, schedule(len(ratios)), threshold=threshold, max_skip=max_skip, warmup=warmup,
                      magnitudes=ratios)  # fmt: skip
    assert magcache_plan(policy) == MAGCACHE[setup]


def test_the_earlier_plans_stay_as_named_options(dit):
    """ditlab's own plans, as configs written before the knobs existed sampled them."""
    taylor = TaylorSeer(dit, schedule(10), interval=4, warmup=2, count_from="after_warmup")
    assert branch_plan(taylor) == [0, 1, 2, 6]
    assert branch_plan(Fora(dit, schedule(10), interval=3, align="start")) == [0, 3, 6, 9]
    assert branch_plan(Fora(dit, schedule(8), interval=2, align="start")) == [0, 2, 4, 6]
    strict = MagCache(dit, schedule(8), threshold=0.25, max_skip=2, warmup=1, magnitudes=EXACT, strict=True)
    assert magcache_plan(strict) == [0, 2, 4, 7]


@pytest.mark.parametrize(("policy", "pinned"), [("fora", {"align": "start"}),
                                                ("taylorseer", {"count_from": "after_warmup"}),
                                                ("magcache", {"strict": True})])  # fmt: skip
def test_the_old_flat_form_pins_the_earlier_plan(policy, pinned):
    assert as_cache_config({"policy": policy, "warmup": None}).options == pinned
    assert as_cache_config({"policy": policy, "options": {}}).options == {}  # new configs: the paper's plan


def test_an_unknown_alignment_is_refused(dit):
    with pytest.raises(ValueError, match="cache.options.align='middle' is not an alignment of the fora policy"):
        Fora(dit, schedule(8), interval=2, align="middle")
