"""Diffusion objectives and samplers.

**Time convention inside ditlab: t = 0 is data, larger t is noise.** The Gaussian objective uses the
integer DDPM step ``0..T-1`` (as DiT does); the flow objective uses continuous ``t in [0, 1]`` with
``x_t = a(t) x_0 + s(t) eps``, ``a(0)=1, s(1)=1`` (REPA/HASTE's convention; SiT's ``t`` is ``1 - t``
here). Public SiT checkpoints are converted when loaded (``ditlab.models.interop.load_sit_checkpoint``), so a
network in ditlab always runs in this convention.

Sampling (``sample``) follows the papers' protocols on request: time grids (``grids``: DiT's respacing, SiT's
linspace), DDIM's last step (``ddim``), SiT's Heun and torchdiffeq's adaptive solvers (``ode``), SiT's SDE
(``sde``), guidance intervals (``guidance``), named in ``presets``. Its loop steps a ``trajectory`` one model
call at a time (sampling-time methods step the same object), and ``images`` is the one path from a
``SamplingConfig`` to images, its model function made by an injected factory (by default the ``cache`` policy).

Every objective has the same two calls: ``prepare(x0) -> Noised`` draws times and noise, and
``losses(output, x0, noised) -> dict`` scores a network output. Methods that need the same noisy input
for two networks (distillation) call ``prepare`` once and ``losses`` twice.
"""

from ditlab.diffusion.flow import FlowMatching
from ditlab.diffusion.gaussian import GaussianDiffusion, Noised

__all__ = ["FlowMatching", "GaussianDiffusion", "Noised"]
