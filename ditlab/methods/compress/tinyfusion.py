"""TinyFusion's learned depth mask: keep the blocks that *recover* best, not those that lose least at once.

TinyFusion ("TinyFusion: Diffusion Transformers Learned Shallow", Fang, Ma, Wang, CVPR 2025, arXiv 2412.01199;
code VainF/TinyFusion, ``prune_by_learning.py`` and ``models_with_layer_pruning.py``) splits the L blocks into
groups of M consecutive blocks and keeps N of each group (an N:M layer scheme, e.g. 1:2 or 2:4 for half the
depth). Each group owns learnable logits over all C(M, N) keep patterns. A training step draws one pattern per
group *for every sample* with a hard straight-through Gumbel-softmax (temperature ``tau`` annealed linearly from
4 to 0.1, logits multiplied by ``scaling`` = 100) and runs the network with block ``l`` giving
``block(h) m_l + h (1 - m_l)``, while the weights are updated jointly (the code's full-weight "delta_w" option;
LoRA is the other) with the ordinary diffusion loss; the gate logits use 10x the weight learning rate, and the
gradients of all of them are clipped to norm 1. An EMA (decay 0.999) of every parameter follows the updates,
and the kept blocks are each group's most likely pattern under the EMA's gate logits; the updated weights are
thrown away and the pruned model starts again from the original weights (then fine-tuned, here with ditlab's
distillation).

Checked against VainF/TinyFusion at a147de7c33c2bc12872b9913f459119068b81ac8: per-sample masks, the gate
gradients and the EMA decision recorded from its ``DiT.forward`` and ``update_ema`` in
``tests/methods/compress/data/tinyfusion_reference.json`` (``tests/methods/compress/test_tinyfusion.py``).
[interp] Gate logits start at 0 (the reference: 0.02, the same uniform softmax); the default weight learning
rate is scaled to toy networks; a step whose loss is not finite is refused rather than skipped.

Text-to-image networks take the same path: ``labels`` are the captions' ``TextFeatures`` (caption drop-out at the
network's rate), a masked MM-DiT block passes both streams through. [interp] On FLUX the N:M groups must not mix
double- and single-stream blocks (``analysis.select_blocks`` refuses a ``group_size`` that would), so each stream
type keeps the same share.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from ditlab.models.dit import DiT
from ditlab.models.taps import run_blocks


def nm_patterns(group_size: int, num_keep: int) -> torch.Tensor:
    """Every way to keep ``num_keep`` of ``group_size`` consecutive blocks: ``(C(M, N), M)`` of 0/1 floats."""
    if not 1 <= num_keep <= group_size:
        raise ValueError(f"an N:M layer mask keeps 1..{group_size} blocks per group, not {num_keep}")
    rows = [[float(b in kept) for b in range(group_size)] for kept in itertools.combinations(range(group_size), num_keep)]
    return torch.tensor(rows)


class LayerMask(nn.Module):
    """Learnable N:M keep pattern over ``depth`` blocks: ``logits (groups, patterns)``, ``patterns (C, M)``."""

    def __init__(self, depth: int, num_keep: int, group_size: int) -> None:
        super().__init__()
        if group_size < 1 or depth % group_size:
            raise ValueError(f"tinyfusion group_size={group_size} must divide the depth {depth}; try 2, 3 or 4")
        groups = depth // group_size
        if num_keep % groups:
            raise ValueError(f"keeping {num_keep} of {depth} blocks is not N per group of {group_size}; choose "
                             f"num_keep as a multiple of {groups} or another group_size")  # fmt: skip
        self.group_size, self.num_groups = group_size, groups
        self.register_buffer("patterns", nm_patterns(group_size, num_keep // groups))
        self.logits = nn.Parameter(torch.zeros(groups, len(self.patterns)))

    def probabilities(self, scaling: float = 100.0) -> torch.Tensor:
        """``(groups, patterns)`` softmax of the scaled logits."""
        return (self.logits * scaling).softmax(-1)

    def sample(self, tau: float, scaling: float = 100.0, generator: torch.Generator | None = None,
               batch: int = 1) -> torch.Tensor:  # fmt: skip
        """A ``(batch, depth)`` 0/1 mask, one pattern per group and sample, differentiable in the logits
        (straight-through)."""
        device = generator.device if generator is not None else self.logits.device
        shape = (batch, *self.logits.shape)
        uniform = torch.rand(shape, generator=generator, device=device).to(self.logits.device)
        uniform = uniform.clamp(1e-10, 1 - 1e-10)
        soft = ((self.logits * scaling - torch.log(-torch.log(uniform))) / tau).softmax(-1)
        hard = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft)
        return ((hard - soft.detach() + soft) @ self.patterns).flatten(1)

    def keep_probability(self, scaling: float = 100.0) -> torch.Tensor:
        """``(depth,)`` marginal probability that each block is kept."""
        return (self.probabilities(scaling) @ self.patterns).flatten().detach()

    def keep(self, logits: torch.Tensor | None = None) -> list[int]:
        """The most likely pattern of every group under ``logits`` (default: the mask's own), as block indices."""
        chosen = self.patterns[(self.logits if logits is None else logits).argmax(-1)]  # (groups, M)
        return [b for b, kept in enumerate(chosen.flatten().tolist()) if kept]


def masked_forward(dit: DiT, mask: torch.Tensor, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                   force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``dit`` with block ``l`` computing ``block(h) m + h (1 - m)``, ``m = mask[..., l]`` (``mask``: ``(depth,)``
    or per sample ``(B, depth)``); blocks with a hard 0 still run, so the gradient reaches their pattern's
    logits."""
    per_sample = mask.reshape(-1, dit.depth)[:, :, None, None]  # (1 or B, depth, 1, 1)
    replace = {index: (lambda h, c, block=block, m=per_sample[:, index]: block(h, c) * m + h * (1 - m))
               for index, block in enumerate(dit.blocks)}  # fmt: skip
    return run_blocks(dit, x, t, y, replace=replace, force_drop_ids=force_drop_ids).output


def learn_layer_mask(dit: DiT, objective, images: torch.Tensor, labels: torch.Tensor, num_keep: int, *,
                     seed: int = 0, group_size: int = 2, steps: int = 100, batch_size: int = 32, lr: float = 1e-4,
                     gate_lr_factor: float = 10.0, tau: tuple[float, float] = (4.0, 0.1), scaling: float = 100.0,
                     update_weights: bool = True, clip_norm: float | None = 1.0, ema_decay: float = 0.999):  # fmt: skip
    """Train a :class:`LayerMask` (and a throw-away copy of ``dit``'s weights) for ``steps`` on ``images``.

    Returns a :class:`~ditlab.methods.compress.analysis.Selection` whose scores are the blocks' marginal keep
    probabilities and whose table holds the final pattern probabilities and the loss curve. The kept blocks are
    the argmax of the EMA (``ema_decay``; 0: the last logits) of the gate logits; gradients are clipped to
    ``clip_norm`` (None: not clipped). ``dit`` is not changed. Deterministic given ``seed`` (batches, noise,
    label drop-out and Gumbel draws use one generator).
    """
    from ditlab.methods.compress.analysis import Selection

    if steps < 1:
        raise ValueError(f"tinyfusion steps={steps} must be at least 1")
    device = next(dit.parameters()).device
    network = copy.deepcopy(dit).train()
    weights = [p for name, p in network.named_parameters() if name != "pos_embed"]
    for parameter in weights:
        parameter.requires_grad_(update_weights)
    mask = LayerMask(dit.depth, num_keep, group_size).to(device)
    groups = [{"params": mask.parameters(), "lr": gate_lr_factor * lr}]
    if update_weights:
        groups.append({"params": weights, "lr": lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    generator = torch.Generator(device=device).manual_seed(seed)
    images, labels = images.to(device), labels.to(device)
    dropout = network.y_embedder.dropout_prob
    losses = []
    ema = mask.logits.detach().clone()  # only the gates' EMA decides; the weights' EMA would be thrown away
    clipped = [*mask.parameters(), *(weights if update_weights else [])]
    with torch.enable_grad():
        for step in range(steps):
            fraction = step / max(steps - 1, 1)
            temperature = tau[0] + (tau[1] - tau[0]) * fraction
            rows = torch.randint(0, len(images), (min(batch_size, len(images)),), device=device, generator=generator)
            x0, y = images[rows], labels[rows]
            noised = objective.prepare(x0, generator=generator)
            drop = (torch.rand(len(y), device=device, generator=generator) < dropout).long()
            sampled = mask.sample(temperature, scaling, generator, batch=len(y))
            output = masked_forward(network, sampled, noised.xt, noised.model_t, y, drop)
            loss = objective.losses(output, x0, noised)["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"tinyfusion: the loss is {loss.item()} at step {step}; lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(clipped, clip_norm)
            optimizer.step()
            ema.mul_(ema_decay).add_(mask.logits.detach(), alpha=1 - ema_decay)
            losses.append(loss.item())
    keep = mask.keep(ema)
    table = {"probabilities": mask.probabilities(scaling).detach().cpu(), "patterns": mask.patterns.cpu(),
             "logits": mask.logits.detach().cpu(), "ema_logits": ema.cpu(), "losses": losses,
             "group_size": group_size, "steps": steps, "update_weights": update_weights}  # fmt: skip
    return Selection("tinyfusion", keep, mask.keep_probability(scaling).cpu(), table)
