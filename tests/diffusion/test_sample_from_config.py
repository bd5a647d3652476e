"""The one path from sampling settings to images: the factory it is given makes the model function, batches are
seeded per sample and decoded one at a time, and the network's mode is left as it was."""

from __future__ import annotations

import pytest
import torch

from ditlab.diffusion.config import SamplingConfig
from ditlab.diffusion.gaussian import GaussianDiffusion
from ditlab.diffusion.images import sample_from_config
from ditlab.diffusion.sample import sample_images

OBJECTIVE = GaussianDiffusion(learn_sigma=True)
SAMPLING = SamplingConfig(sampler="ddim", steps=4, cfg_scale=2.0, batch_size=2, time_grid="trailing",
                          guidance_interval=(0.0, 0.5))  # fmt: skip


def test_the_default_factory_samples_the_network_in_batches_with_per_sample_seeds(tiny_dit):
    dit = tiny_dit(depth=2, learn_sigma=True).train()
    labels = torch.arange(5)
    images = sample_from_config(dit, OBJECTIVE, SAMPLING, labels, seed=3)
    assert dit.training  # sampled in eval mode, then left in the mode it had
    dit.eval()
    expected = sample_images(dit, OBJECTIVE, labels, seed=3, batch_size=2, sampler="ddim", steps=4, cfg_scale=2.0,
                             time_grid="trailing", guidance_interval=(0.0, 0.5))  # fmt: skip
    assert torch.equal(images, expected)


def test_an_injected_factory_makes_the_model_function_and_decode_sees_each_batch(tiny_dit):
    dit = tiny_dit(depth=2, learn_sigma=True)
    seen, batches = {}, []

    def factory(network, objective, **options):
        seen.update(options, network=network, objective=objective)
        return lambda x, t, y: network(x, t, y) * 0.5

    def decode(latents):
        batches.append(len(latents))
        return latents + 1

    images = sample_from_config(dit, OBJECTIVE, SAMPLING, torch.arange(3), factory=factory, decode=decode, steps=3)
    assert seen["network"] is dit and seen["objective"] is OBJECTIVE and seen["steps"] == 3
    assert seen["cache"].policy == "none" and "batch_size" not in seen
    assert batches == [2, 1] and images.shape == (3, 1, 8, 8)
    plain = sample_from_config(dit, OBJECTIVE, SAMPLING, torch.arange(3), steps=3)
    assert not torch.equal(images - 1, plain)


def test_an_unknown_option_is_one_line(tiny_dit):
    with pytest.raises(ValueError, match=r"unknown sampling option\(s\) \['stepz'\]"):
        sample_from_config(tiny_dit(depth=2), OBJECTIVE, SAMPLING, torch.arange(2), stepz=3)
