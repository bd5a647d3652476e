"""The objective and sampling settings every method module shares (the network's is ``DiTConfig``).

They are dataclasses so that LightningCLI validates every key (a misspelt key is refused by name) and
``ditlab fit --help`` lists each option with its default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ditlab.diffusion.flow import FlowMatching
from ditlab.diffusion.gaussian import GaussianDiffusion


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
    """How sample grids and metrics draw images; ``sampler`` None means ddpm (gaussian) or euler (flow)."""

    sampler: str | None = None
    steps: int = 50
    cfg_scale: float = 1.5
    cfg_channels: int | None = None
    batch_size: int = 256
