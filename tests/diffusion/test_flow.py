"""The interpolant (SiT) objective: paths, targets, time sampling, and sampling an analytic velocity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ditlab.diffusion.flow import FlowMatching
from ditlab.diffusion.sample import sample_images, seeded_noise
from ditlab.models.dit import DiT

MU, STD = 1.5, 0.4


def path_coefficients(path: str, t: torch.Tensor):
    """Independent ``(a, s, da/dt, ds/dt)`` of ``x_t = a x0 + s eps`` in ditlab's convention (t=0 data)."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    half_pi = math.pi / 2
    return (
        torch.cos(half_pi * t),
        torch.sin(half_pi * t),
        -half_pi * torch.sin(half_pi * t),
        half_pi * torch.cos(half_pi * t),
    )


class GaussianVelocity(nn.Module):
    """The exact minimiser of the velocity loss for data ``x0 ~ N(mu, std^2 I)``, called like a DiT.

    ``x_t ~ N(a mu, a^2 std^2 + s^2)``; ``E[x0 | x_t] = mu + a std^2 (x_t - a mu) / var`` and
    ``E[eps | x_t] = s (x_t - a mu) / var``; the optimal velocity is ``da E[x0|x_t] + ds E[eps|x_t]``.
    """

    def __init__(self, path: str, mu: float = MU, std: float = STD, t_scale: float = 1.0) -> None:
        super().__init__()
        self.path, self.mu, self.std, self.t_scale = path, mu, std, t_scale
        self.shape = (4, 32, 32)  # a plain model function: the sampler is told its shape
        self.anchor = nn.Parameter(torch.zeros(()))  # sample_images reads the device from the parameters
        self.seen_t: list[float] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = (t / self.t_scale).to(torch.float64).view(-1, 1, 1, 1)
        self.seen_t.append(t.flatten()[0].item())
        a, s, da, ds = path_coefficients(self.path, t)
        x = x.to(torch.float64)
        var = a**2 * self.std**2 + s**2
        centred = x - a * self.mu
        x0 = self.mu + a * self.std**2 * centred / var
        eps = s * centred / var
        return (da * x0 + ds * eps).to(torch.float32)


@pytest.mark.parametrize(
    ("path", "sampler", "steps", "t_scale"),
    [
        ("linear", "euler", 200, 1.0),
        ("linear", "heun", 25, 1000.0),
        ("gvp", "euler", 200, 1.0),
        ("gvp", "heun", 25, 1.0),
    ],
)
def test_sampler_reaches_gaussian_data_distribution(path, sampler, steps, t_scale):
    objective = FlowMatching(path=path, t_scale=t_scale)
    model = GaussianVelocity(path, t_scale=t_scale)
    samples = sample_images(model, objective, torch.zeros(8, dtype=torch.long), seed=0, batch_size=8,
                            steps=steps, sampler=sampler, shape=model.shape)  # fmt: skip
    assert samples.shape == (8, 4, 32, 32)
    mean, std = samples.mean().item(), samples.std().item()
    assert abs(mean - MU) < 0.02 * MU, mean
    assert abs(std - STD) < 0.02 * STD, std
    # per sample: the probability-flow map between these Gaussians is x0 = mu + std * eps
    exact = MU + STD * seeded_noise(samples.shape, seed=0)
    assert (samples - exact).abs().max() < 0.02
    # the network saw t = 1 (noise) first and went down towards 0 (data), in [0, 1] after undoing t_scale
    assert model.seen_t[0] == pytest.approx(1.0) and model.seen_t[-1] < 0.05
    assert all(0 <= t <= 1 for t in model.seen_t)
    assert len(model.seen_t) == (steps if sampler == "euler" else 2 * steps - 1)


@pytest.mark.parametrize(("sampler", "order"), [("euler", 1), ("heun", 2)])
def test_sampler_convergence_order(sampler, order):
    """Doubling the steps divides the error by 2 (Euler) or 4 (Heun): the schedulers integrate dx/dt exactly."""
    labels = torch.zeros(1, dtype=torch.long)
    exact = MU + STD * seeded_noise((1, 4, 32, 32), seed=0)
    errors = []
    for steps in (20, 40, 80):
        samples = sample_images(
            GaussianVelocity("linear"), FlowMatching(), labels, steps=steps, sampler=sampler, shape=(4, 32, 32)
        )
        errors.append((samples - exact).abs().max().item())
    for coarse, fine in zip(errors[:-1], errors[1:]):
        assert 2**order * 0.8 < coarse / fine < 2**order * 1.25, errors


def test_wrong_velocity_sign_misses_the_data():
    """Control for the test above: integrating the negated velocity must not land on N(mu, std^2)."""

    class Negated(GaussianVelocity):
        def forward(self, x, t, y):
            return -super().forward(x, t, y)

    samples = sample_images(Negated("linear"), FlowMatching(), torch.zeros(2, dtype=torch.long), steps=20,
                            shape=(4, 32, 32))
    assert abs(samples.mean().item() - MU) > 0.5


def test_analytic_velocity_minimises_the_objective():
    """The closed-form velocity beats a perturbed one on the objective's own loss (it is the regression optimum)."""
    objective = FlowMatching()
    model = GaussianVelocity("linear")
    generator = torch.Generator().manual_seed(0)
    x0 = MU + STD * torch.randn(4096, 2, 4, 4, generator=generator)
    noised = objective.prepare(x0, generator=generator)
    optimal = model(noised.xt, noised.model_t, None)
    best = objective.losses(optimal, x0, noised)["loss"]
    for delta in (0.1, -0.1):
        assert objective.losses(optimal + delta, x0, noised)["loss"] > best
        assert objective.losses(optimal * (1 + delta), x0, noised)["loss"] > best


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_coefficients_match_independent_definitions(path):
    objective = FlowMatching(path=path)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for ours, expected in zip(objective.coefficients(t), path_coefficients(path, t)):
        torch.testing.assert_close(ours, expected)


def test_gvp_is_variance_preserving():
    a, s, _, _ = FlowMatching(path="gvp").coefficients(torch.linspace(0, 1, 257, dtype=torch.float64))
    torch.testing.assert_close(a**2 + s**2, torch.ones(257, dtype=torch.float64))
    a, s, _, _ = FlowMatching(path="linear").coefficients(torch.tensor([0.5], dtype=torch.float64))
    assert (a**2 + s**2).item() == pytest.approx(0.5)  # the linear path is not


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_endpoints_follow_ditlab_convention(path):
    objective = FlowMatching(path=path)
    x0, noise = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(objective.add_noise(x0, torch.zeros(3, dtype=torch.float64), noise), x0)
    torch.testing.assert_close(objective.add_noise(x0, torch.ones(3, dtype=torch.float64), noise), noise)
    halfway = objective.add_noise(x0, torch.full((3,), 0.5, dtype=torch.float64), noise)
    weight = 0.5 if path == "linear" else math.cos(math.pi / 4)
    torch.testing.assert_close(halfway, weight * x0 + (1 - weight if path == "linear" else weight) * noise)


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_target_is_time_derivative_of_path(path):
    objective = FlowMatching(path=path)
    x0, noise = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randn(4, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.0, 0.2, 0.7, 1.0], dtype=torch.float64)
    noised = FlowMatching(path=path).prepare(x0)
    noised.t, noised.noise = t, noise
    h = 1e-6  # central difference in float64
    derivative = (objective.add_noise(x0, t + h, noise) - objective.add_noise(x0, t - h, noise)) / (2 * h)
    torch.testing.assert_close(objective.target(x0, noised), derivative, atol=1e-7, rtol=1e-6)
    if path == "linear":
        torch.testing.assert_close(objective.target(x0, noised), noise - x0)


def test_prepare_and_losses():
    objective = FlowMatching(t_scale=1000.0)
    x0 = torch.randn(8, 4, 8, 8)
    noised = objective.prepare(x0, generator=torch.Generator().manual_seed(0))
    assert ((noised.t >= 0) & (noised.t <= 1)).all() and noised.t.std() > 0.1
    torch.testing.assert_close(noised.model_t, noised.t * 1000)
    torch.testing.assert_close(noised.xt, objective.add_noise(x0, noised.t, noised.noise))
    target = noised.noise - x0
    assert objective.losses(target, x0, noised)["loss"] == 0
    # a learned-sigma output: the extra channels are ignored, as in SiT
    extra = torch.cat([target, torch.randn_like(target)], dim=1)
    terms = objective.losses(extra, x0, noised)
    assert set(terms) == {"loss_diffusion", "loss"} and terms["loss"] == 0
    wrong = objective.losses(torch.zeros_like(target), x0, noised)["loss"]
    torch.testing.assert_close(wrong, target.pow(2).mean())


def test_sit_at_init_outputs_zero_and_trains_velocity_channels():
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=3)
    objective = FlowMatching()
    x0 = torch.randn(2, 4, 8, 8)
    noised = objective.prepare(x0)
    output = dit(noised.xt, noised.model_t, torch.tensor([0, 1]))
    assert output.shape == (2, 8, 8, 8) and torch.count_nonzero(output) == 0
    objective.losses(output, x0, noised)["loss"].backward()
    grad = dit.final_layer.linear.weight.grad.view(2 * 2, 2, 4, 32)  # (p, p, C_out, D) rows of the head
    assert torch.count_nonzero(grad[:, :, :4]) > 0 and torch.count_nonzero(grad[:, :, 4:]) == 0


def test_logit_normal_time_sampling():
    objective = FlowMatching(time_sampling="logit_normal", logit_mean=0.6, logit_std=1.2)
    t = objective.sample_time(40000, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert ((t > 0) & (t < 1)).all()
    median = 1 / (1 + math.exp(-0.6))
    assert t.median().item() == pytest.approx(median, abs=0.01)
    logits = torch.log(t / (1 - t))
    assert logits.mean().item() == pytest.approx(0.6, abs=0.03)
    assert logits.std().item() == pytest.approx(1.2, abs=0.03)
    uniform = FlowMatching().sample_time(
        40000, torch.device("cpu"), generator=torch.Generator().manual_seed(0)
    )
    assert uniform.median().item() == pytest.approx(0.5, abs=0.01)
    assert uniform.std().item() == pytest.approx(1 / math.sqrt(12), abs=0.005)


def test_time_epsilon_clips_the_ends():
    objective = FlowMatching(t_eps=0.05)
    t = objective.sample_time(20000, torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    assert t.min() >= 0.05 and t.max() <= 0.95
    assert t.min() < 0.051 and t.max() > 0.949


def test_unknown_options_name_the_choices():
    with pytest.raises(ValueError, match=r"choices: \['linear', 'gvp'\]"):
        FlowMatching(path="vp")
    with pytest.raises(ValueError, match=r"choices: \['uniform', 'logit_normal'\]"):
        FlowMatching(time_sampling="beta")
