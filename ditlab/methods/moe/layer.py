"""The ``moe`` feed-forward kind: shared plus routed experts in a DiT block (DiT-MoE, Dense2MoE).

Fei et al., "Scaling Diffusion Transformers to 16 Billion Parameters" (DiT-MoE, arXiv 2407.11633; code
feizc/DiT-MoE): every block's MLP becomes ``y = sum_{e in TopK} g_e E_e(h) + S(h)`` with SwiGLU experts of
width 4D, one always-on shared expert (DiT-MoE's "2 shared experts" are one SwiGLU of width 2D), a bias-free
softmax router and an expert balance loss. Dense2MoE (arXiv 2510.09094) carves a dense FFN into the same
shape (``ditlab.methods.compress.carve``). Choose it from a config:

    network:
      preset: digits
      mlp: moe
      mlp_options: {num_experts: 8, top_k: 2, expert_hidden: 128, shared_hidden: 84}

Dispatch is dropless and the same in training and evaluation: assignments sorted by expert, one matmul per
expert on its rows, weighted outputs added back per token. A training forward leaves ``loss_balance`` (and
``loss_router_z``) in ``aux_losses``; ``load`` holds the share of assignments per expert of the last forward.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ditlab.methods.moe.experts import EXPERT_KINDS, ExpertBank
from ditlab.methods.moe.routing import (
    BALANCE_SCOPES,
    GATES,
    ROUTINGS,
    Routing,
    balance_loss,
    expert_capacity,
    expert_choice,
    router_z_loss,
    token_choice,
)
from ditlab.models.components import register_mlp
from ditlab.models.config import DiTConfig
from ditlab.models.mlp import DenseMLP


@dataclass
class MoEOptions:
    """The ``mlp_options`` of the ``moe`` kind.

    Args:
        num_experts: routed experts E.
        top_k: experts per token K (token choice), or the mean experts per token (expert choice capacity).
        expert_hidden: inner width of each routed expert; None is the config's MLP width (4D, DiT-MoE).
        shared_hidden: inner width of the always-on shared expert; None is 2D (DiT-MoE), 0 is none.
        expert: ``swiglu`` (DiT-MoE) or ``gelu`` (DiT's MLP, with biases; what Dense2MoE carves).
        routing: ``token_choice`` (each token its top-K experts) or ``expert_choice`` (each expert its top
            tokens of an image).
        gate: ``softmax`` (raw probabilities, DiT-MoE), ``normalized`` (top-K renormalised; token choice only)
            or ``straight_through`` (value 1, gradient of the probability).
        capacity_factor: expert choice: tokens per expert are ``capacity_factor * N * K / E``.
        balance_weight: alpha of the balance loss (token choice; 0 turns it off).
        balance_scope: ``device`` (DiT-MoE), ``global`` (counts over all processes) or ``sequence`` (per image).
        z_loss_weight: weight of the router z-loss (ST-MoE); 0 turns it off.
        blocks: indices of the blocks that get experts; None is every block (the others keep DiT's dense MLP).
    """

    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int | None = None
    shared_hidden: int | None = None
    expert: str = "swiglu"
    routing: str = "token_choice"
    gate: str = "softmax"
    capacity_factor: float = 1.0
    balance_weight: float = 0.01
    balance_scope: str = "device"
    z_loss_weight: float = 0.0
    blocks: list[int] | None = None

    @classmethod
    def from_config(cls, config: DiTConfig) -> MoEOptions:
        """The options of ``config.mlp_options``, checked; each mistake is one line naming the key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config.mlp_options) - known)
        if unknown:
            raise ValueError(f"unknown mlp_options {unknown} for the moe MLP; known: {sorted(known)}")
        options = cls(**config.mlp_options)
        options.expert_hidden = config.mlp_width if options.expert_hidden is None else options.expert_hidden
        options.shared_hidden = 2 * config.hidden_size if options.shared_hidden is None else options.shared_hidden
        options.check(config.depth)
        return options

    def check(self, depth: int) -> None:
        for name in ("num_experts", "top_k", "expert_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"mlp_options.{name}={value!r} must be a positive integer")
        if self.top_k > self.num_experts:
            raise ValueError(f"mlp_options.top_k={self.top_k} exceeds num_experts={self.num_experts}; "
                             "choose top_k <= num_experts")  # fmt: skip
        if not isinstance(self.shared_hidden, int) or self.shared_hidden < 0:
            raise ValueError(f"mlp_options.shared_hidden={self.shared_hidden!r} must be 0 (no shared expert) or more")
        for name, choices in (("expert", EXPERT_KINDS), ("routing", ROUTINGS), ("gate", GATES),
                              ("balance_scope", BALANCE_SCOPES)):  # fmt: skip
            if getattr(self, name) not in choices:
                raise ValueError(f"mlp_options.{name}={getattr(self, name)!r}; choices: {list(choices)}")
        if self.routing == "expert_choice" and self.gate == "normalized":
            raise ValueError("mlp_options.gate='normalized' renormalises a token's top-K and needs "
                             "routing='token_choice'; use softmax or straight_through with expert_choice")  # fmt: skip
        if self.capacity_factor <= 0:
            raise ValueError(f"mlp_options.capacity_factor={self.capacity_factor} must be positive")
        if self.blocks is not None:
            outside = [b for b in self.blocks if not (isinstance(b, int) and 0 <= b < depth)]
            if outside:
                raise ValueError(f"mlp_options.blocks has {outside} outside 0..{depth - 1} for a DiT of depth {depth}")


class MoEFeedForward(nn.Module):
    """Shared and routed experts on ``tokens: (B, N, D)`` (see the module docstring)."""

    def __init__(self, dim: int, options: MoEOptions, num_tokens: int) -> None:
        super().__init__()
        self.options, self.num_tokens = options, num_tokens
        self.router = nn.Parameter(torch.empty(options.num_experts, dim))
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))  # a bias-free nn.Linear's init, as DiT-MoE's router
        self.experts = ExpertBank(options.num_experts, dim, options.expert_hidden, options.expert)
        self.shared = ExpertBank(1, dim, options.shared_hidden, options.expert) if options.shared_hidden else None
        self.bias = nn.Parameter(torch.zeros(dim)) if options.expert == "gelu" else None
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.load: torch.Tensor | None = None
        """``(E,)`` share of the last forward's assignments that went to each expert (detached)."""

    @property
    def num_experts(self) -> int:
        return self.options.num_experts

    def capacity(self, num_tokens: int) -> int:
        options = self.options
        return expert_capacity(num_tokens, options.num_experts, options.top_k, options.capacity_factor)

    def route(self, tokens: torch.Tensor) -> Routing:
        """The assignments of ``tokens: (B, N, D)``."""
        logits = tokens @ self.router.to(tokens.dtype).t()
        if self.options.routing == "token_choice":
            return token_choice(logits, self.options.top_k, self.options.gate)
        return expert_choice(logits, self.capacity(tokens.shape[1]), self.options.gate)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, dim = tokens.shape
        flat = tokens.reshape(-1, dim)
        routing = self.route(tokens)
        out = dispatch(flat, routing, self.experts)
        if self.shared is not None:
            out = out + self.shared(0, flat)
        if self.bias is not None:
            out = out + self.bias
        if flat.shape[0]:  # a block a Mixture of Blocks skipped for every image sees no token
            counts = routing.counts.detach().float()
            self.load = counts / counts.sum()
        if self.training:
            self.aux_losses = self.router_losses(routing)
        return out.reshape(batch, num_tokens, dim)

    def router_losses(self, routing: Routing) -> dict[str, torch.Tensor]:
        """The balance loss (token choice) and z-loss of one forward; zero without tokens (a skipped block)."""
        options, losses = self.options, {}
        if options.routing == "token_choice" and options.balance_weight:
            losses["loss_balance"] = balance_loss(routing.probs, routing.topk, options.num_experts,
                                                  options.balance_weight, options.balance_scope)  # fmt: skip
        if options.z_loss_weight:
            losses["loss_router_z"] = options.z_loss_weight * router_z_loss(routing.logits)
        return losses

    # ----------------------------------------------------------------------------------- accounting
    def routed_per_token(self, num_tokens: int) -> float:
        """Routed experts a token uses: K (token choice) or ``E C / N`` on average (expert choice)."""
        if self.options.routing == "token_choice":
            return float(self.options.top_k)
        return self.num_experts * self.capacity(num_tokens) / num_tokens

    def macs(self, num_tokens: int) -> int:
        """Per image: the router on every token, the shared expert on every token, each assignment's expert."""
        shared = self.shared.macs_per_token() if self.shared is not None else 0
        assignments = round(self.routed_per_token(num_tokens) * num_tokens)
        return num_tokens * (self.router.numel() + shared) + assignments * self.experts.macs_per_token()

    def activated_parameters(self) -> int:
        """What one token uses: router, shared expert, output bias and its routed experts (rounded)."""
        always = self.router.numel() + (self.bias.numel() if self.bias is not None else 0)
        always += sum(p.numel() for p in self.shared.parameters()) if self.shared is not None else 0
        return always + round(self.routed_per_token(self.num_tokens) * self.experts.parameters_per_expert())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.options).items() if k != "blocks")


def dispatch(tokens: torch.Tensor, routing: Routing, experts: ExpertBank) -> torch.Tensor:
    """Dropless dispatch: ``tokens: (T, D)`` -> ``sum over assignments of weight * expert(token)``, ``(T, D)``.

    Every expert runs, on however many rows it got (zero included), so all expert weights are in the graph on
    every step (DDP needs no unused-parameter search) and the same code serves training and evaluation.
    Expert parallelism would replace this function: the rows are already grouped by expert, so ``counts`` are
    the split sizes of an all-to-all to the processes that own each expert.
    """
    gathered = tokens[routing.token]
    pieces = gathered.split(routing.counts.tolist())
    outputs = torch.cat([experts(index, piece) for index, piece in enumerate(pieces)])
    weighted = outputs * routing.weight.to(outputs.dtype).unsqueeze(-1)
    return tokens.new_zeros(tokens.shape[0], weighted.shape[-1]).index_add(0, routing.token, weighted)


@register_mlp("moe")
def moe_mlp(config: DiTConfig, block: int | None = None) -> nn.Module:
    """The ``moe`` kind: experts in ``mlp_options.blocks`` (default all), DiT's dense MLP in the other blocks."""
    options = MoEOptions.from_config(config)
    if block is not None and options.blocks is not None and block not in options.blocks:
        return DenseMLP(config.hidden_size, config.mlp_width)
    return MoEFeedForward(config.hidden_size, options, config.num_tokens)
