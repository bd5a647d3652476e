"""The DDPM objective used by DiT (Ho et al. 2020; learned variance from Nichol & Dhariwal, "Improved
Denoising Diffusion Probabilistic Models", 2021).

Linear betas 1e-4..0.02 over T=1000 steps, epsilon (or v) prediction with a mean-squared error, and,
when the network learns its variance, the variational bound term ``L_vb`` on the interpolation
coefficient with a stop-gradient on the predicted mean, weighted 1 as in DiT (IDDPM's hybrid loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ditlab.diffusion.ddim import GridDDIM
from ditlab.diffusion.global_batch import draw_rows
from ditlab.diffusion.grids import TimeGrid, gaussian_grid
from ditlab.diffusion.steppers import DiffusersStepper, Stepper


@dataclass
class Noised:
    """A noisy training input: ``xt = a(t) x0 + s(t) noise``; ``model_t`` is what the network sees."""

    xt: torch.Tensor
    t: torch.Tensor
    model_t: torch.Tensor
    noise: torch.Tensor


def mean_flat(values: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: ``(B, ...) -> (B,)``."""
    return values.flatten(1).mean(1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """A fast tanh approximation of the standard normal CDF (the one IDDPM uses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under a Gaussian, elementwise."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


class GaussianDiffusion:
    """DDPM training objective. ``prediction`` is ``"epsilon"`` (DiT) or ``"v_prediction"``."""

    kind = "gaussian"

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction: str = "epsilon",
        learn_sigma: bool = True,
    ) -> None:
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"unknown prediction {prediction!r}; choices: ['epsilon', 'v_prediction']")
        self.num_timesteps = num_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.prediction = prediction
        self.learn_sigma = learn_sigma
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.tables = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
            "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
            "log_betas": torch.log(betas),
        }

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at steps ``t: (B,)`` broadcast to ``like``'s shape and dtype."""
        values = self.tables[name].to(t.device)[t].to(like.dtype)
        return values.view(-1, *([1] * (like.ndim - 1)))

    def prepare(self, x0: torch.Tensor, generator: torch.Generator | None = None, rank: int = 0,
                world_size: int = 1) -> Noised:  # fmt: skip
        """Draw ``t ~ U{0..T-1}`` and noise, and return the noisy input; ``rank``/``world_size``: this process's
        rows of the global batch's draws (``ditlab.diffusion.global_batch``)."""
        batch, device = x0.shape[0], x0.device
        t = draw_rows(lambda n: torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator),
                      batch, rank, world_size)  # fmt: skip
        noise = draw_rows(lambda n: torch.randn((n, *x0.shape[1:]), device=device, dtype=x0.dtype, generator=generator),
                          batch, rank, world_size)  # fmt: skip
        return Noised(xt=self.add_noise(x0, t, noise), t=t, model_t=self.model_time(t), noise=noise)

    # ----------------------------------------------------------------------------------- time convention
    samplers = ("ddpm", "ddim", "dpm++")
    default_sampler = "ddpm"

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is given for time ``t``: the DDPM step itself, as a float (DiT's convention)."""
        return t.float()

    def noise_level(self, t: torch.Tensor | float) -> float:
        """Where step ``t`` lies between data (0) and noise (1): ``t / T`` (guidance intervals use it)."""
        return float(t) / self.num_timesteps

    def time_at(self, fractions: torch.Tensor) -> torch.Tensor:
        """Objective times at ``fractions`` in (0, 1) of the noise range (0 data, 1 noise): integer steps."""
        if len(fractions) > self.num_timesteps:
            raise ValueError(f"num_timesteps={len(fractions)} exceeds the objective's {self.num_timesteps} steps")
        return (fractions * self.num_timesteps).long().clamp(max=self.num_timesteps - 1)

    def scheduler(self, sampler: str, spacing: str | None = None, alpha_to_one: bool = False):
        """The diffusers scheduler that integrates this objective with ``sampler``; ``spacing`` is diffusers'
        ``timestep_spacing`` (None: the scheduler's default), ``alpha_to_one`` DDIM's ``set_alpha_to_one``."""
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

        if sampler not in self.samplers:
            raise ValueError(f"sampler {sampler!r} does not apply to the Gaussian objective; choices: {list(self.samplers)}")
        common = {
            "num_train_timesteps": self.num_timesteps, "beta_start": self.beta_start,
            "beta_end": self.beta_end, "beta_schedule": "linear", "prediction_type": self.prediction,
            **({"timestep_spacing": spacing} if spacing is not None else {}),
        }  # fmt: skip
        if sampler == "ddpm":
            variance = "learned_range" if self.learn_sigma else "fixed_small"
            return DDPMScheduler(**common, variance_type=variance, clip_sample=False)
        if sampler == "ddim":
            return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=alpha_to_one)
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++")

    def scheduler_time(self, timestep: torch.Tensor, scheduler) -> torch.Tensor:
        """The objective time of a scheduler timestep (the same integer step here)."""
        return timestep

    def stepper(self, sampler: str, steps: int | None, time_grid: TimeGrid = None,
                ddim_alpha_to_one: bool | None = None, **_) -> Stepper:  # fmt: skip
        """``sampler`` on ``time_grid`` (``ditlab.diffusion.grids``): diffusers' DDPM and DPM-Solver++ on any grid
        (``set_timesteps(timesteps=...)``) and DDIM on its own spacings; ditlab's DDIM on the other grids.
        DDIM lands on the predicted data after its last step unless ``ddim_alpha_to_one`` is False; None means
        the public DiT's x0 on ditlab's grids (``dit``, ``dit-ddim``, lists), diffusers' default on its spacings."""
        timesteps = gaussian_grid(time_grid, steps, self.num_timesteps)
        alpha_to_one = ddim_alpha_to_one if ddim_alpha_to_one is not None else timesteps is not None
        if sampler == "ddim" and timesteps is not None:
            return GridDDIM(self, timesteps, alpha_to_one)
        scheduler = self.scheduler(sampler, spacing=time_grid if timesteps is None else None, alpha_to_one=alpha_to_one)
        if timesteps is None:
            scheduler.set_timesteps(steps)
        else:
            scheduler.set_timesteps(timesteps=timesteps)
            if sampler == "ddpm":  # float64 tables, as the public DiT keeps them: x0 = (x - sqrt(1-abar) eps) /
                # sqrt(abar) cancels near t = T, and diffusers' float32 tables put 1e-4 into few-step samples
                scheduler.alphas_cumprod = self.tables["alphas_cumprod"].clone()
                scheduler.one = torch.tensor(1.0, dtype=torch.float64)
        return DiffusersStepper(scheduler, self)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def target(self, x0: torch.Tensor, noised: Noised) -> torch.Tensor:
        if self.prediction == "epsilon":
            return noised.noise
        t = noised.t
        return self._at("sqrt_alphas_cumprod", t, x0) * noised.noise - self._at("sqrt_one_minus_alphas_cumprod", t, x0) * x0

    def prediction_channels(self, output: torch.Tensor, channels: int) -> torch.Tensor:
        """The mean-prediction half of a learned-sigma output."""
        return output[:, :channels]

    def losses(self, output: torch.Tensor, x0: torch.Tensor, noised: Noised) -> dict[str, torch.Tensor]:
        """``loss_diffusion`` (MSE), ``loss_vb`` when learning sigma, and their sum ``loss``; all scalars."""
        channels = x0.shape[1]
        prediction = output[:, :channels]
        terms = {"loss_diffusion": mean_flat((prediction - self.target(x0, noised)) ** 2).mean()}
        if self.learn_sigma:
            if output.shape[1] != 2 * channels:
                raise ValueError(f"learn_sigma needs {2 * channels} output channels, the network gives {output.shape[1]}")
            frozen = torch.cat([prediction.detach(), output[:, channels:]], dim=1)
            terms["loss_vb"] = self.vb_terms(frozen, x0, noised).mean()
        terms["loss"] = sum(terms.values())
        return terms

    def predict_x0(self, prediction: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "epsilon":
            return self._at("sqrt_recip_alphas_cumprod", t, xt) * xt - self._at("sqrt_recipm1_alphas_cumprod", t, xt) * prediction
        return self._at("sqrt_alphas_cumprod", t, xt) * xt - self._at("sqrt_one_minus_alphas_cumprod", t, xt) * prediction

    def predict_eps(self, prediction: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "epsilon":
            return prediction
        return self._at("sqrt_alphas_cumprod", t, xt) * prediction + self._at("sqrt_one_minus_alphas_cumprod", t, xt) * xt

    def vb_terms(self, output: torch.Tensor, x0: torch.Tensor, noised: Noised) -> torch.Tensor:
        """Per-sample variational bound in bits/dim: KL for t>0, decoder NLL at t=0. ``(B,)``."""
        channels = x0.shape[1]
        xt, t = noised.xt, noised.t
        true_mean = self._at("posterior_mean_coef1", t, x0) * x0 + self._at("posterior_mean_coef2", t, x0) * xt
        true_log_var = self._at("posterior_log_variance_clipped", t, x0)
        fraction = (output[:, channels:] + 1) / 2
        model_log_var = fraction * self._at("log_betas", t, x0) + (1 - fraction) * true_log_var
        pred_x0 = self.predict_x0(output[:, :channels], xt, t)
        model_mean = self._at("posterior_mean_coef1", t, x0) * pred_x0 + self._at("posterior_mean_coef2", t, x0) * xt
        kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)
