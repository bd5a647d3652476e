"""The DDPM objective: noising, targets, the learned-variance bound and a tiny overfit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ditlab.diffusion.gaussian import GaussianDiffusion, Noised, normal_kl
from ditlab.models.dit import DiT


def noised_at(objective: GaussianDiffusion, x0: torch.Tensor, step: int, seed: int = 0) -> Noised:
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=x0.dtype)
    t = torch.full((x0.shape[0],), step, dtype=torch.long)
    return Noised(xt=objective.add_noise(x0, t, noise), t=t, model_t=t.float(), noise=noise)


def test_schedule_tables_match_ddpm():
    objective = GaussianDiffusion()
    betas = np.linspace(1e-4, 0.02, 1000)
    alphas_cumprod = np.cumprod(1 - betas)
    np.testing.assert_allclose(objective.tables["alphas_cumprod"].numpy(), alphas_cumprod, rtol=1e-12)
    assert objective.tables["alphas_cumprod"][-1] < 5e-5  # t = 999 is (almost) pure noise


def test_add_noise_matches_diffusers():
    objective = GaussianDiffusion()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"
    )
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=generator)
    noise = torch.randn(6, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ours = objective.add_noise(x0, t, noise)
    torch.testing.assert_close(
        ours, scheduler.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5
    )  # diffusers builds its tables in float32
    assert not torch.allclose(ours[2], ours[3])
    # prepare draws t in {0..T-1} and noises consistently
    noised = objective.prepare(x0, generator=torch.Generator().manual_seed(1))
    assert noised.t.dtype == torch.long and 0 <= noised.t.min() and noised.t.max() < 1000
    torch.testing.assert_close(
        noised.xt, scheduler.add_noise(x0, noised.noise, noised.t), atol=1e-5, rtol=1e-5
    )
    assert torch.equal(noised.model_t, noised.t.float())


def test_v_prediction_target_identity():
    objective = GaussianDiffusion(prediction="v_prediction", learn_sigma=False)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", prediction_type="v_prediction"
    )
    x0 = torch.randn(5, 4, 8, 8, dtype=torch.float64)
    noised = objective.prepare(x0, generator=torch.Generator().manual_seed(2))
    v = objective.target(x0, noised)
    a = objective.tables["sqrt_alphas_cumprod"][noised.t].view(-1, 1, 1, 1)
    s = objective.tables["sqrt_one_minus_alphas_cumprod"][noised.t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, a * noised.noise - s * x0)
    # v = d x_t / d phi for x_t = cos(phi) x0 + sin(phi) eps: a x_t - s v = x0 and s x_t + a v = eps
    torch.testing.assert_close(a * noised.xt - s * v, x0)
    torch.testing.assert_close(s * noised.xt + a * v, noised.noise)
    torch.testing.assert_close(objective.predict_x0(v, noised.xt, noised.t), x0)
    torch.testing.assert_close(v.float(), scheduler.get_velocity(x0.float(), noised.noise.float(), noised.t),
                               atol=2e-6, rtol=1e-5)  # fmt: skip
    # an exact v prediction has zero loss; the epsilon objective's target is the noise itself
    assert objective.losses(v, x0, noised)["loss"] == 0
    eps_objective = GaussianDiffusion(learn_sigma=False)
    assert torch.equal(eps_objective.target(x0, noised), noised.noise)
    torch.testing.assert_close(eps_objective.predict_x0(noised.noise, noised.xt, noised.t), x0)
    with pytest.raises(ValueError, match="choices"):
        GaussianDiffusion(prediction="x0")


def test_vb_gradient_does_not_reach_eps_channels():
    objective = GaussianDiffusion()
    x0 = torch.randn(4, 4, 8, 8)
    noised = objective.prepare(x0, generator=torch.Generator().manual_seed(0))
    noised.t[0] = 0  # include the decoder NLL term
    output = torch.randn(4, 8, 8, 8, requires_grad=True)
    terms = objective.losses(output, x0, noised)
    assert set(terms) == {"loss_diffusion", "loss_vb", "loss"}
    torch.testing.assert_close(terms["loss"], terms["loss_diffusion"] + terms["loss_vb"])
    (grad_vb,) = torch.autograd.grad(terms["loss_vb"], output, retain_graph=True)
    assert torch.count_nonzero(grad_vb[:, :4]) == 0
    assert torch.count_nonzero(grad_vb[:, 4:]) > 0
    (grad_mse,) = torch.autograd.grad(terms["loss_diffusion"], output)
    assert torch.count_nonzero(grad_mse[:, 4:]) == 0
    assert torch.count_nonzero(grad_mse[:, :4]) > 0
    # without the stop-gradient the bound would push on the mean
    (grad_free,) = torch.autograd.grad(objective.vb_terms(output, x0, noised).mean(), output)
    assert torch.count_nonzero(grad_free[:, :4]) > 0


def test_learn_sigma_needs_twice_the_channels():
    objective = GaussianDiffusion()
    x0 = torch.randn(2, 4, 8, 8)
    noised = objective.prepare(x0)
    with pytest.raises(ValueError, match="learn_sigma needs 8 output channels"):
        objective.losses(torch.randn(2, 4, 8, 8), x0, noised)
    assert set(GaussianDiffusion(learn_sigma=False).losses(torch.randn(2, 4, 8, 8), x0, noised)) == {
        "loss_diffusion", "loss"}  # fmt: skip


@pytest.mark.parametrize("step", [1, 137, 600])
def test_vb_kl_matches_closed_form(step):
    objective = GaussianDiffusion()
    generator = torch.Generator().manual_seed(step)
    x0 = torch.rand(3, 2, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    noised = noised_at(objective, x0, step)
    output = torch.randn(3, 4, 4, 4, generator=generator, dtype=torch.float64)
    eps_hat, v = output[:, :2].numpy(), output[:, 2:].numpy()
    # independent numpy reference (IDDPM eqs. 6-7 and 15)
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    abar_t, abar_prev, beta_t = abar[step], abar[step - 1], betas[step]
    posterior_var = beta_t * (1 - abar_prev) / (1 - abar_t)
    xt, x = noised.xt.numpy(), x0.numpy()
    coef1, coef2 = (
        beta_t * np.sqrt(abar_prev) / (1 - abar_t),
        (1 - abar_prev) * np.sqrt(1 - beta_t) / (1 - abar_t),
    )
    true_mean = coef1 * x + coef2 * xt
    x0_hat = (xt - np.sqrt(1 - abar_t) * eps_hat) / np.sqrt(abar_t)
    model_mean = coef1 * x0_hat + coef2 * xt
    frac = (v + 1) / 2
    model_var = np.exp(frac * np.log(beta_t) + (1 - frac) * np.log(posterior_var))
    kl = 0.5 * (
        np.log(model_var / posterior_var) + (posterior_var + (true_mean - model_mean) ** 2) / model_var - 1
    )
    expected = kl.reshape(3, -1).mean(1) / np.log(2)
    ours = objective.vb_terms(output, x0, noised)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-8)
    assert (ours > 0).all()
    # the exact posterior gives zero KL
    exact = torch.cat([noised.noise, torch.full_like(noised.noise, -1.0)], dim=1)
    if step > 1:  # at step 1 the clipped posterior variance is not the true one
        assert objective.vb_terms(exact, x0, noised).abs().max() < 1e-9


def test_vb_at_step_zero_is_discretized_nll():
    objective = GaussianDiffusion()
    x0 = torch.linspace(-1, 1, 2 * 16, dtype=torch.float64).view(2, 1, 4, 4)
    noised = noised_at(objective, x0, 0)
    output = torch.cat([noised.noise, torch.zeros_like(noised.noise)], dim=1)
    nll = objective.vb_terms(output, x0, noised).numpy()
    # reference: Gaussian with the model mean (= x0 for the true noise) and log-variance mix at t=0
    betas = np.linspace(1e-4, 0.02, 1000)
    log_var = 0.5 * np.log(betas[0]) + 0.5 * np.log(
        betas[1] * (1 - (1 - betas[0])) / (1 - (1 - betas[0]) * (1 - betas[1]))
    )
    std = math.exp(0.5 * log_var)

    def cdf(z):
        return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))

    x = x0.numpy()
    upper = np.where(x > 0.999, 1.0, cdf((1 / 255) / std))
    lower = np.where(x < -0.999, 0.0, cdf((-1 / 255) / std))
    expected = -np.log(upper - lower).reshape(2, -1).mean(1) / np.log(2)
    np.testing.assert_allclose(nll, expected, rtol=1e-6)


def test_normal_kl_closed_form():
    kl = normal_kl(torch.tensor(1.0), torch.tensor(math.log(4.0)), torch.tensor(0.0), torch.tensor(0.0))
    # KL(N(1, 4) || N(0, 1)) = 0.5 (4 + 1 - 1 - ln 4)
    assert math.isclose(kl.item(), 0.5 * (4 + 1 - 1 - math.log(4)), rel_tol=1e-6)


def test_tiny_dit_overfits_two_class_toy_latents():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randn(2, 4, 8, 8, generator=generator)
    labels = torch.arange(2).repeat(8)
    data = prototypes[labels] + 0.05 * torch.randn(16, 4, 8, 8, generator=generator)
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=2)
    objective = GaussianDiffusion()
    optimizer = torch.optim.AdamW(dit.parameters(), lr=1e-3, weight_decay=0)
    losses = []
    for _ in range(200):
        noised = objective.prepare(data, generator=generator)
        loss = objective.losses(dit(noised.xt, noised.model_t, labels), data, noised)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert np.isfinite(losses).all()
    assert last < 0.5 * first, (first, last)
