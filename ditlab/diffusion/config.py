"""The objective and sampling settings every method module shares (the network's is ``DiTConfig``).

They are dataclasses so that LightningCLI validates every key (a misspelt key is refused by name) and
``ditlab fit --help`` lists each option with its default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

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
class CacheConfig:
    """A training-free feature cache for sampling (``ditlab.methods.sampling.caches``): the policy and its knobs.

    A knob left at None takes the policy's default; setting a knob the policy does not read is an error. The
    identity settings (``interval: 1``, ``threshold: 0``, ``blocks: 0``) sample exactly what no cache samples.

    Args:
        policy: none | fora | delta-dit | teacache | taylorseer | magcache | toca | plan.
        interval: fora, delta-dit, taylorseer, toca: compute everything every this many model calls.
        threshold: teacache: accumulated rescaled input change that triggers a computed call;
            magcache: accumulated magnitude-ratio error allowed before computing.
        blocks: delta-dit: width of the cached block range (0 .. depth).
        boundary: delta-dit: share of the calls (0 .. 1) that cache the rear range before switching to the front.
        order: taylorseer: order of the Taylor forecast (0 reuses, as fora).
        max_skip: magcache: most consecutive reused calls.
        warmup: model calls at the start that always compute.
        ratio: toca: share of tokens whose MLP is recomputed on a cached call.
        coefficients: teacache: rescaling polynomial (highest power first); None fits it on this model.
        magnitudes: magcache: residual magnitude ratio of every call; None calibrates it on one sample.
        path: plan: the static plan file (JSON) a learned router was exported to (``ditlab.methods.sampling.cache_router``).
    """

    policy: str = "none"
    interval: int | None = None
    threshold: float | None = None
    blocks: int | None = None
    boundary: float | None = None
    order: int | None = None
    max_skip: int | None = None
    warmup: int | None = None
    ratio: float | None = None
    coefficients: list[float] | None = None
    magnitudes: list[float] | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        check = CACHE_CHECKS.get(self.policy)
        if check is None and self.policy != "none":
            raise ValueError(f"unknown cache policy {self.policy!r} (cache.policy / --cache); registered: "
                             f"{sorted({'none', *CACHE_CHECKS})} (policies register when ditlab.methods is imported)")  # fmt: skip
        if check is not None:
            check(self)


CACHE_CHECKS: dict[str, Callable[[CacheConfig], None]] = {}
"""Knob checks of the cache policies that sampling-time methods register (``ditlab.methods.sampling.caches``), so a bad
knob fails when the config is made while the core imports nothing from the methods."""


@dataclass
class SamplingConfig:
    """How sample grids and metrics draw images; ``sampler`` None means ddpm (gaussian) or euler (flow).
    ``cache`` wraps the network in a feature-caching policy (default none).

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
        cache: the feature-caching policy and its knobs (``CacheConfig``; default none).
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
    cache: CacheConfig = field(default_factory=CacheConfig)
    time_grid: str | list[float] | None = None
    ddim_alpha_to_one: bool | None = None
    guidance_interval: tuple[float, float] | None = None
    sde: SDEConfig = field(default_factory=SDEConfig)
    atol: float = 1e-6
    rtol: float = 1e-3

    def __post_init__(self) -> None:
        if isinstance(self.cache, dict):  # as read back from a checkpoint's asdict()
            self.cache = CacheConfig(**self.cache)
        if isinstance(self.sde, dict):
            self.sde = SDEConfig(**self.sde)
        check_sampling_options(self.sampler, self.steps, self.time_grid, self.guidance_interval)
