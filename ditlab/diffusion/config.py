"""The objective and sampling settings every method module shares (the network's is ``DiTConfig``).

They are dataclasses so that LightningCLI validates every key (a misspelt key is refused by name) and
``ditlab fit --help`` lists each option with its default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ditlab.diffusion.cache import CacheConfig, as_cache_config
from ditlab.diffusion.flow import FlowMatching
from ditlab.diffusion.gaussian import GaussianDiffusion
from ditlab.diffusion.sample import check_sampling_options
from ditlab.diffusion.sde import SDEConfig


@dataclass
class ObjectiveConfig:
    """The training objective: ``gaussian`` (DDPM, DiT) or ``flow`` (interpolants, SiT)."""

    kind: Literal["gaussian", "flow"] = "gaussian"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: Literal["epsilon", "v_prediction"] = "epsilon"
    path: Literal["linear", "gvp"] = "linear"
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    t_eps: float = 0.0
    t_scale: float = 1.0

    def build(self, learn_sigma: bool) -> GaussianDiffusion | FlowMatching:
        if self.kind == "gaussian":
            return GaussianDiffusion(self.num_timesteps, self.beta_start, self.beta_end, self.prediction, learn_sigma)
        return FlowMatching(self.path, self.time_sampling, self.logit_mean, self.logit_std, self.t_eps, self.t_scale)


@dataclass
class SamplingConfig:
    """How sample grids and metrics draw images; ``sampler`` None means ddpm (gaussian) or euler (flow).
    ``cache`` wraps the network in a feature-caching policy (default none; ``ditlab.diffusion.cache``).

    The papers' protocols (``ditlab.diffusion.presets``): the public DiT is ``sampler: ddpm, steps: 250,
    time_grid: dit, cfg_channels: 3``; SiT's SDE is ``sampler: sde, steps: 250``; REPA adds
    ``guidance_interval: [0, 0.7]``; SiT's ODE is ``sampler: dopri5, steps: null``.

    The fields are the sampling protocol of ``ditlab.diffusion.sample.denoise``.

    Args:
        sampler: gaussian: ddpm | ddim | dpm++; flow: euler | heun | sde | dopri5 (or another torchdiffeq adaptive
            method: dopri8, bosh3, adaptive_heun, fehlberg2).
        steps: model steps on a named grid (``sit``: grid points, as SiT counts them); null for adaptive solvers
            and explicit grids. Default 50.
        cfg_scale: classifier-free guidance scale (1: no guidance).
        cfg_channels: guide only the first this many channels (the public DiT guides 3 of 4); null: all.
        batch_size: images per sampling batch (a memory knob: the samples do not depend on it).
        cache: the feature-caching policy and its options (``CacheConfig``: ``{policy, options}``; default none).
        time_grid: null (default: each diffusers scheduler's own grid, as before), ``dit`` (the public DiT's
            respacing), ``dit-ddim``, ``leading`` | ``linspace`` | ``trailing`` (diffusers), ``sit``
            (``linspace(0, 1, N)``; the SDE's default), or a list of times from noise to data.
        ddim_alpha_to_one: DDIM's last step lands on the predicted x0 (the public DiT) or at step 0's noise level;
            null (default): x0 on ditlab's grids, diffusers' ``set_alpha_to_one=False`` on its spacings.
        guidance_interval: [low, high] noise levels (0 data, 1 noise; DDPM: step / T) where guidance applies;
            null (default): everywhere.
        sde: the SDE sampler's diffusion coefficient and last step (``SDEConfig``; default SiT's: sigma, mean, 0.04).
        atol: adaptive solvers' absolute tolerance (default SiT's 1e-6).
        rtol: adaptive solvers' relative tolerance (default SiT's 1e-3).
    """

    sampler: str | None = None
    steps: int | None = 50
    cfg_scale: float = 1.5
    cfg_channels: int | None = None
    batch_size: int = 256
    cache: CacheConfig | dict[str, Any] = field(default_factory=CacheConfig)  # dict: the old flat form reads too
    time_grid: str | list[float] | None = None
    ddim_alpha_to_one: bool | None = None
    guidance_interval: tuple[float, float] | None = None
    sde: SDEConfig = field(default_factory=SDEConfig)
    atol: float = 1e-6
    rtol: float = 1e-3

    def __post_init__(self) -> None:
        self.cache = as_cache_config(self.cache)  # a checkpoint's asdict(), old flat form included
        if isinstance(self.sde, dict):
            self.sde = SDEConfig(**self.sde)
        check_sampling_options(self.sampler, self.steps, self.time_grid, self.guidance_interval)
