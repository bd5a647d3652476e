"""Named sampling protocols: the settings each paper evaluated its FID with, so a number is comparable by name.

- ``dit-ddpm-250``: Peebles & Xie, DiT-XL/2 FID 2.27: ancestral DDPM with the learned variance, 250 steps on the
  public DiT's respacing, guidance 1.5 on 3 of 4 latent channels (facebookresearch/DiT ``sample_ddp.py``).
- ``dit-ddim-50``: the same network with DDIM on the respaced grid, last step to x0 (DiT's ``--ddim`` path; the
  step count used by caching papers such as Learning-to-Cache; ``steps`` overrides it, e.g. 20).
- ``sit-ode-dopri5``: Ma et al., SiT's default ODE: torchdiffeq dopri5, atol 1e-6, rtol 1e-3, guidance 1.5 on 3
  channels.
- ``sit-sde-250``: SiT-XL/2 FID 2.06: Euler-Maruyama, 250 steps, diffusion ``sigma``, "Mean" last step of 0.04.
- ``repa-sde-guidance-interval``: Yu et al., REPA FID 1.42: the same SDE with guidance 1.8 on all channels for
  t <= 0.7 only (``guidance_high``); HASTE evaluates the same way with its own scale and interval
  (``cfg_scale``/``guidance_interval`` overrides).

In a config the preset is spelt out (``configs/dit_imagenet256.yaml`` lists these fields); in code
``sampling_preset(name, **overrides)`` gives the ``SamplingConfig``.
"""

from __future__ import annotations

from typing import Any

SAMPLING_PRESETS: dict[str, dict[str, Any]] = {
    "dit-ddpm-250": {"sampler": "ddpm", "steps": 250, "time_grid": "dit", "cfg_scale": 1.5, "cfg_channels": 3},
    "dit-ddim-50": {"sampler": "ddim", "steps": 50, "time_grid": "dit", "cfg_scale": 1.5, "cfg_channels": 3},
    "sit-ode-dopri5": {"sampler": "dopri5", "steps": None, "atol": 1e-6, "rtol": 1e-3, "cfg_scale": 1.5,
                       "cfg_channels": 3},
    "sit-sde-250": {"sampler": "sde", "steps": 250, "time_grid": "sit", "cfg_scale": 1.5, "cfg_channels": 3,
                    "sde": {"diffusion": "sigma", "norm": 1.0, "last_step": "mean", "last_step_size": 0.04}},
    "repa-sde-guidance-interval": {"sampler": "sde", "steps": 250, "time_grid": "sit", "cfg_scale": 1.8,
                                   "cfg_channels": None, "guidance_interval": (0.0, 0.7),
                                   "sde": {"diffusion": "sigma", "norm": 1.0, "last_step": "mean",
                                           "last_step_size": 0.04}},
}  # fmt: skip


def sampling_preset(name: str, **overrides: Any):
    """The ``SamplingConfig`` of protocol ``name`` with ``overrides`` (e.g. ``batch_size``, ``steps``) applied."""
    from ditlab.diffusion.config import SamplingConfig

    if name not in SAMPLING_PRESETS:
        raise ValueError(f"unknown sampling preset {name!r}; choices: {sorted(SAMPLING_PRESETS)}")
    return SamplingConfig(**{**SAMPLING_PRESETS[name], **overrides})
