"""``configs/l2c.yaml`` trains as Learning-to-Cache does (horseee/learning-to-cache d6cc781, ``DiT/README.md``
and ``DiT/train_router.py``): unguided, with the sparsity weight its README gives for 20 NFE."""

from __future__ import annotations

from pathlib import Path

import yaml

RECIPE = Path(__file__).resolve().parents[3] / "configs" / "l2c.yaml"
L2C_SPARSITY = {50: 1e-6, 20: 5e-6, 10: 1e-6}  # README, DiT-XL/2 256: --l1 per NFE


def test_the_l2c_recipe_trains_unguided_with_the_reference_sparsity():
    init = yaml.safe_load(RECIPE.read_text())["model"]["init_args"]
    router, sampling = init["router"], init["sampling"]
    assert router["mode"] == "l2c" and sampling["sampler"] == "ddim"
    assert router["train_cfg_scale"] == 1.0  # train_router.py calls the model without guidance
    assert router["sparsity"] == L2C_SPARSITY[sampling["steps"]]
