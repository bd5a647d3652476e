"""Elastic-DiT: a router per block that skips the block or narrows its MLP, per sample (Wang et al., ICML 2026,
arXiv 2602.13993; code wangjiangshan0725/Elastic-DiT, inference and loss only).

Per block, a router reads the block's input tokens under its own adaLN modulation of the conditioning:
``(shift, scale) = W(SiLU(c))``, ``z = LN(x)(1 + scale) + shift``, ``h = ReLU(W1 z)``; the skip logit is
``mean_tokens(w2 . h)`` and the width logits ``mean_tokens(W3 h)`` over the widths ``{1/4, 1/2, 3/4, 1}`` of the
MLP (prefixes of its hidden units). Training: hard gate ``g = 1[p > 0.5]`` with the straight-through
``g + p - sg(p)`` on ``x + g (block(x) - x)``, and the arg-max width with a straight-through softmax mask on the
MLP's hidden units. The skip head starts at ``logit(0.7)`` and the width head at +2 on "full", so at
initialisation every block is open at full width: the plain DiT.

Inference skips closed samples (the block runs on the open rows only) and cuts the MLP to its first ``k``
hidden units per width (contiguous rows of ``fc1``, columns of ``fc2``): savings in wall time, which the masked
training arithmetic (kept as the ``masked`` form, the reference) does not give. [interp] Decisions are per
sample rather than the released batch mean; the released block cache (reuse when ``p`` is just above 0.5) is
not part of this trunk (feature caching is ``ditlab.methods.sampling.caches``).

PixArt blocks are routed as DiT's: the router reads the block input under its modulation of the condition's adaLN
vector (the timestep embedding), a closed block skips its attention, cross-attention and MLP, and the width
narrows the MLP ([interp]: the cross-attention of an open block runs in full). MM-DiT blocks are refused
(:func:`~ditlab.methods.dynamic.routing.plain_blocks`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.methods.dynamic import ops
from ditlab.methods.dynamic.routing import Decisions, DynamicTrunk, plain_blocks, straight_through
from ditlab.models.branch import Branch
from ditlab.models.components import register_trunk
from ditlab.models.condition import condition_vector
from ditlab.models.config import DiTConfig
from ditlab.models.dit import modulate


class BlockRouter(nn.Module):
    """Skip logit ``(B,)`` and width logits ``(B, W)`` from a block's input tokens and the conditioning."""

    def __init__(self, dim: int, hidden: int, widths: int, open_prob: float, full_bias: float, std: float) -> None:
        super().__init__()
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.inner = nn.Linear(dim, hidden)
        self.skip = nn.Linear(hidden, 1)
        self.width = nn.Linear(hidden, widths)
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)
        for head in (self.skip, self.width):
            nn.init.normal_(head.weight, std=std)
            nn.init.zeros_(head.bias)
        nn.init.constant_(self.skip.bias, math.log(open_prob / (1 - open_prob)))
        with torch.no_grad():
            self.width.bias[-1] = full_bias

    def forward(self, tokens: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale = self.modulation(condition_vector(cond)).chunk(2, dim=1)
        hidden = F.relu(self.inner(modulate(self.norm(tokens), shift, scale)))
        return self.skip(hidden).mean(1).squeeze(-1), self.width(hidden).mean(1)

    def macs(self, num_tokens: int) -> int:
        per_token = self.inner.weight.numel() + self.skip.weight.numel() + self.width.weight.numel()
        return self.modulation[-1].weight.numel() + num_tokens * per_token


class ElasticTrunk(DynamicTrunk):
    """The blocks behind Elastic-DiT routers; options are ``DiTConfig.trunk_options``.

    Args:
        widths: MLP width fractions a block may use, ascending, the last 1 (E-DiT: 1/4, 1/2, 3/4, 1).
        router_hidden: the router's hidden width (E-DiT: 128; default ``min(128, hidden_size)``).
        open_prob: initial open probability of every block (E-DiT: 0.7).
        full_bias: initial width logit of "full" (E-DiT: +2).
        head_std: std of the routers' output weights at initialisation (E-DiT: 1e-3).
    """

    def __init__(self, config: DiTConfig, widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
                 router_hidden: int | None = None, open_prob: float = 0.7, full_bias: float = 2.0,
                 head_std: float = 1e-3) -> None:  # fmt: skip
        super().__init__()
        widths = tuple(float(w) for w in widths)
        width = config.mlp_width
        if not widths or widths[-1] != 1.0 or any(not 0 < w <= 1 for w in widths) or list(widths) != sorted(widths):
            raise ValueError(f"trunk_options.widths={list(widths)} must ascend within (0, 1] and end at 1.0")
        units = [round(w * width) for w in widths]
        if any(abs(u - w * width) > 1e-6 or u < 1 for u, w in zip(units, widths)):
            raise ValueError(f"trunk_options.widths={list(widths)} do not cut the MLP width {width} into whole "
                             "channels; pick fractions f with f * width an integer")  # fmt: skip
        if not 0 < open_prob < 1:
            raise ValueError(f"trunk_options.open_prob={open_prob} must be in (0, 1) (E-DiT: 0.7)")
        self.widths, self.channels, self.mlp_width = widths, units, width
        hidden = router_hidden or min(128, config.hidden_size)
        self.routers = nn.ModuleList(BlockRouter(config.hidden_size, hidden, len(widths), open_prob, full_bias,
                                                 head_std) for _ in range(config.depth))  # fmt: skip
        self.register_buffer("width_values", torch.tensor(widths), persistent=False)
        prefix = torch.arange(width)[None] < torch.tensor(units)[:, None]
        self.register_buffer("prefix_masks", prefix.float(), persistent=False)

    def forward(self, dit: nn.Module, tokens: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return self.run_plain(dit, tokens, cond)
        num_tokens = tokens.shape[1]
        saved = tokens.new_zeros(len(tokens))
        opened, probabilities, chosen, expected = [], [], [], []
        for index, block in enumerate(dit.blocks):
            ops.check_plain_components(block, index, "Elastic-DiT")
            skip_logit, width_logits = self.routers[index](tokens, cond)
            p = torch.sigmoid(skip_logit)
            gate = (p > 0.5).to(tokens.dtype)
            choice = width_logits.argmax(1)
            share = F.softmax(width_logits, dim=1)
            if self.training:
                gate = straight_through(gate, p)
                hard = F.one_hot(choice, len(self.widths)).to(tokens.dtype)
                channel_mask = straight_through(hard @ self.prefix_masks, share @ self.prefix_masks)
                rho = straight_through(self.width_values[choice], share @ self.width_values)
                out = block(tokens, cond, branches=self.width_hook(block, channel_mask), index=index)
                gate_ = gate[:, None, None]
                tokens = gate_ * out + (1 - gate_) * tokens  # x + g (block(x) - x), exact for g in {0, 1}
            else:
                rho = self.width_values[choice]
                tokens = self.run_block(block, index, tokens, cond, gate.bool(), choice)
            block_macs = block.macs(num_tokens, dit.config)
            mlp_macs = block.mlp.macs(num_tokens)
            saved = saved + (1 - gate) * block_macs + gate * mlp_macs * (1 - rho)
            opened.append(gate)
            probabilities.append(p)
            chosen.append(rho)
            expected.append(share @ self.width_values)
        self.last = Decisions(saved, self.dense_block_macs(dit, num_tokens), {
            "open": torch.stack(opened, 1), "open_prob": torch.stack(probabilities, 1),
            "width": torch.stack(chosen, 1), "expected_width": torch.stack(expected, 1)})  # fmt: skip
        return tokens

    def width_hook(self, block: nn.Module, channel_mask: torch.Tensor):
        def hook(branch: Branch) -> torch.Tensor:
            if branch.kind != "mlp":  # attention, and a PixArt block's cross-attention, run in full
                return branch.compute()
            return ops.mlp(block.mlp, branch.inputs(), channel_mask)

        return hook

    def run_block(self, block: nn.Module, index: int, tokens: torch.Tensor, cond: torch.Tensor, gate: torch.Tensor,
                  choice: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Evaluation: closed rows pass through, open rows run the block with their width."""
        if self.form == "masked":
            channel_mask = self.prefix_masks[choice]
            out = block(tokens, cond, branches=self.width_hook(block, channel_mask), index=index)
            return torch.where(gate[:, None, None], out, tokens)
        result = tokens
        for option in choice[gate].unique().tolist():
            rows = (gate & (choice == option)).nonzero().squeeze(1)
            every = len(rows) == len(tokens)
            part = block(tokens if every else tokens[rows], cond if every else cond[rows],
                         branches=self.sliced_hook(block, option), index=index)  # fmt: skip
            if every:
                return part
            if result is tokens:
                result = tokens.clone()
            result[rows] = part
        return result

    def sliced_hook(self, block: nn.Module, option: int):
        units = self.channels[option]

        def hook(branch: Branch) -> torch.Tensor:
            if branch.kind != "mlp" or units == self.mlp_width:
                return branch.compute()
            key = (id(block), units, ops.weights_version(block.mlp))
            channels = torch.arange(units, device=block.mlp.fc1.weight.device)
            return self.cached(key, lambda: ops.SlicedMLP(block.mlp, channels))(branch.inputs())

        return hook

    def budget_terms(self, decisions: Decisions, dynamic, levels) -> dict[str, torch.Tensor]:
        """Elastic-DiT's budget: the share of open blocks follows the noise level (``keep_high`` at noise to
        ``keep_low`` at data) and the open blocks' expected width follows ``width_target``."""
        if not dynamic.budget_weight:
            return {}
        keep = dynamic.keep_high + (dynamic.keep_low - dynamic.keep_high) * levels()
        terms = {"loss_keep": dynamic.budget_weight * ((decisions.details["open_prob"].mean(1) - keep) ** 2).mean()}
        widths = decisions.details["expected_width"][decisions.details["open_prob"].detach() > 0.5]
        terms["loss_width"] = dynamic.budget_weight * ((widths.mean() - dynamic.width_target) ** 2 if len(widths)
                                                       else widths.sum())  # fmt: skip
        return terms

    def macs(self, num_tokens: int) -> int:
        return sum(router.macs(num_tokens) for router in self.routers)


@register_trunk("elastic")
def elastic_trunk(config: DiTConfig) -> ElasticTrunk:
    plain_blocks(config, "elastic")
    return ElasticTrunk(config, **config.trunk_options)
