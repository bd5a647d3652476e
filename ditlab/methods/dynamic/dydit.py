"""DyDiT: timestep-wise dynamic width and spatial-wise dynamic tokens (Zhao et al., ICLR 2025, arXiv 2410.03456;
DyDiT++ arXiv 2504.06803; code NUS-HPC-AI-Lab/Dynamic-Diffusion-Transformer).

Per block, two routers read the timestep embedding ``e(t)`` alone (not ``c``, so the width depends on the step
and never on the class): one switches attention heads off (head 0 always on), one switches MLP channel groups
off (group 0 always on). A per-token router lets tokens bypass the MLP: ``h + m_tok * g2 * MLP(.)``; attention
always sees every token. Router biases start at +15 (token router +35) so at initialisation every mask is 1 and
the network is the plain DiT.

Inference here is the sliced form the released code lacks (it multiplies by masks): per block, the kept heads'
``qkv`` rows and ``proj`` columns and the kept groups' ``fc1`` rows and ``fc2`` columns are cut once per
distinct pattern, and the MLP runs on the kept tokens only (gather -> MLP -> scatter). Because the width masks
depend on ``t`` only, :func:`~ditlab.methods.dynamic.export.export` stores them as a per-timestep table, so
sampling reads the pattern instead of running the width routers. Rows of a batch that share ``t`` (both CFG
halves included) share one slice.

As the reference does, MLP channel groups mask ``fc1``'s output before the GELU (the straight-through gradient
into the group routers depends on where), the token router reads the residual stream after attention (the
unnormalised ``h + g1 * attn``; ``token_input: modulated`` reads the MLP's modulated input instead, what ditlab's
earlier trunk did and what routers it trained expect), and the FLOPs ratio divides by attention plus MLP (the
adaLN linear is in neither numerator nor denominator).

PixArt blocks (Chen et al., 2023: self-attention, cross-attention to the caption, MLP) are routed as DiT's: the
head router narrows the self-attention, the group router the MLP, the token router lets tokens bypass the MLP,
reading the residual stream the MLP is added to (after attention *and* cross-attention). [interp] The
cross-attention runs in full (every head and token: the caption is read by every image token) and is counted in
the FLOPs ratio's denominator (its projections and its mixing over the call's caption tokens), so a PixArt
network's ratio is of its whole attention, cross-attention and MLP work (the adaLN-single modulation is, as DiT's
adaLN, in neither numerator nor denominator). MM-DiT blocks are refused (their joint attention carries both
streams, :func:`~ditlab.methods.dynamic.routing.plain_blocks`).

Checked against the authors' release, read through the kawgit/DyDiT fork at the authors' commit
0ddc5097d2bc38c9b68b6c32ac6b53adadc1f865 (``DyDiT/models.py``, ``dynamic_model.py``, ``loss.py``, ``train.py``):
outputs, router gradients, FLOPs ratio, token decisions and lambda recorded from it in
``tests/methods/dynamic/data/dydit_reference.json`` (``tests/methods/dynamic/test_dydit_reference.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from ditlab.methods.dynamic import ops
from ditlab.methods.dynamic.routing import (
    Decisions,
    DynamicTrunk,
    hard_gumbel_sigmoid,
    plain_blocks,
    with_always_on,
)
from ditlab.models.branch import Branch
from ditlab.models.components import register_trunk
from ditlab.models.condition import TextCondition
from ditlab.models.config import DiTConfig


class DyDiTTrunk(DynamicTrunk):
    """The blocks with DyDiT's width and token routers; options are ``DiTConfig.trunk_options``.

    Args:
        groups: MLP channel groups (default: as many as attention heads, as in DyDiT); must divide the MLP width.
        token_routing: let tokens bypass the MLP (SDT).
        temperature: Gumbel-sigmoid temperature in training (DyDiT: 5).
        width_bias: initial bias of the width routers (+15: every head and group on).
        token_bias: initial bias of the token routers' last layer (+35: every token kept).
        token_reduction: the token router's hidden width is ``hidden_size // token_reduction``.
        table_steps: rows of the exported per-timestep width table (0: no table, the routers decide).
        token_input: what the token router reads: ``residual`` (DyDiT: the tokens after attention) or
            ``modulated`` (the MLP's normalised, modulated input: ditlab's earlier trunk).
    """

    def __init__(self, config: DiTConfig, groups: int | None = None, token_routing: bool = True,
                 temperature: float = 5.0, width_bias: float = 15.0, token_bias: float = 35.0,
                 token_reduction: int = 16, table_steps: int = 0, token_input: str = "residual") -> None:  # fmt: skip
        super().__init__()
        heads, width, dim = config.num_heads, config.mlp_width, config.hidden_size
        groups = groups or heads
        if groups < 1 or width % groups:
            raise ValueError(f"trunk_options.groups={groups} does not divide the MLP width {width}; pick a divisor "
                             f"of {width} (default: num_heads={heads})")  # fmt: skip
        if temperature <= 0:
            raise ValueError(f"trunk_options.temperature={temperature} must be positive (DyDiT: 5)")
        if token_input not in ("residual", "modulated"):
            raise ValueError(f"trunk_options.token_input={token_input!r}; choices: residual (DyDiT), modulated")
        self.token_input = token_input
        self.num_heads, self.groups, self.mlp_width = heads, groups, width
        self.temperature, self.token_routing = float(temperature), bool(token_routing)
        self.head_routers = nn.ModuleList(nn.Linear(dim, heads - 1) for _ in range(config.depth))
        self.group_routers = nn.ModuleList(nn.Linear(dim, groups - 1) for _ in range(config.depth))
        hidden = max(1, dim // token_reduction)
        self.token_routers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1)) for _ in range(config.depth)
        ) if token_routing else None  # fmt: skip
        for router in [*self.head_routers, *self.group_routers]:
            nn.init.constant_(router.bias, width_bias)
        for router in self.token_routers or []:
            nn.init.constant_(router[-1].bias, token_bias)
        self.timestep_macs = 256 * dim + dim * dim  # the width routers read e(t), computed once more for them
        self.register_buffer("width_table", torch.ones(table_steps, config.depth, heads + groups, dtype=torch.bool)
                             if table_steps else None)  # fmt: skip

    # ------------------------------------------------------------------------------------------- decisions
    def width_masks(self, dit: nn.Module, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L, H)`` head masks and ``(B, L, G)`` group masks for timesteps ``t: (B,)``."""
        table = self.width_table
        if table is not None and not self.training and bool(((t >= 0) & (t < len(table)) & (t == t.round())).all()):
            rows = table[t.long()].to(t.dtype if t.is_floating_point() else torch.float32)
            return rows[..., : self.num_heads], rows[..., self.num_heads:]
        embedding = dit.t_embedder(t)
        heads = torch.stack([with_always_on(hard_gumbel_sigmoid(r(embedding), self.temperature, self.training))
                             for r in self.head_routers], dim=1)  # fmt: skip
        groups = torch.stack([with_always_on(hard_gumbel_sigmoid(r(embedding), self.temperature, self.training))
                              for r in self.group_routers], dim=1)  # fmt: skip
        return heads, groups

    def token_mask(self, index: int, inputs: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` tokens that go through block ``index``'s MLP."""
        if self.token_routers is None:
            return inputs.new_ones(inputs.shape[:2])
        logits = self.token_routers[index](inputs).squeeze(-1)
        return hard_gumbel_sigmoid(logits, self.temperature, self.training)

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, dit: nn.Module, tokens: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return self.run_plain(dit, tokens, cond)
        num_tokens = tokens.shape[1]
        heads, groups = self.width_masks(dit, t)
        saved = tokens.new_zeros(len(tokens))
        kept_fraction = []
        sliced = not self.training and self.form == "sliced"
        for index, block in enumerate(dit.blocks):
            ops.check_plain_components(block, index, "DyDiT")
            kept: list[torch.Tensor] = []
            hook = (self.sliced_hook if sliced else self.masked_hook)(block, heads[:, index], groups[:, index], kept,
                                                                      tokens)  # fmt: skip
            tokens = block(tokens, cond, branches=hook, index=index)
            attn_macs, mlp_macs = block.attn.macs(num_tokens), block.mlp.macs(num_tokens)
            token_share = kept[0].mean(1)
            saved = saved + attn_macs * (1 - heads[:, index].mean(1))
            saved = saved + mlp_macs * (1 - groups[:, index].mean(1) * token_share)
            kept_fraction.append(token_share)
        dense = float(sum(block.attn.macs(num_tokens) + cross_attention_macs(block, num_tokens, cond)
                          + block.mlp.macs(num_tokens) for block in dit.blocks))  # fmt: skip
        self.last = Decisions(saved, dense, {
            "heads": heads.detach().sum(-1), "groups": groups.detach().sum(-1),
            "tokens": torch.stack(kept_fraction, 1).detach()})  # fmt: skip
        return tokens

    def routed_tokens(self, tokens: torch.Tensor, kept: list):
        """``(after_attention, after_cross_attention, route)``: a hook records the attention branch's output in
        ``after_attention`` (and a PixArt block's cross-attention output, added ungated, in
        ``after_cross_attention``) and ``route(branch, inputs)`` gives the MLP branch's token mask from what
        ``token_input`` names; the residual is the block's own expression, so it is bitwise the tokens the MLP
        branch is added to."""
        residual: list[torch.Tensor] = []

        def after_attention(branch: Branch, out: torch.Tensor) -> torch.Tensor:
            if self.token_input == "residual":
                residual.append(tokens + branch.gate.unsqueeze(1) * out)
            return out

        def after_cross_attention(branch: Branch, out: torch.Tensor) -> torch.Tensor:
            if residual:
                residual.append(residual.pop() + out)
            return out

        def route(branch: Branch, inputs: torch.Tensor) -> torch.Tensor:
            keep = self.token_mask(branch.block, residual.pop() if residual else inputs)
            kept.append(keep)
            return keep

        return after_attention, after_cross_attention, route

    def masked_hook(self, block: nn.Module, heads: torch.Tensor, groups: torch.Tensor, kept: list,
                    tokens: torch.Tensor):  # fmt: skip
        """Every head, channel and token computed; the switched-off ones multiplied by 0 (training, reference)."""
        after_attention, after_cross_attention, route = self.routed_tokens(tokens, kept)

        def hook(branch: Branch) -> torch.Tensor:
            if branch.kind == "cross_attention":
                return after_cross_attention(branch, branch.compute())
            inputs = branch.inputs()
            if branch.kind == "attention":
                return after_attention(branch, ops.attention(block.attn, inputs, heads))
            keep = route(branch, inputs)
            out = ops.mlp(block.mlp, inputs, ops.expand_groups(groups, self.mlp_width), before_act=True)
            return out * keep.unsqueeze(-1).to(out.dtype)

        return hook

    def sliced_hook(self, block: nn.Module, heads: torch.Tensor, groups: torch.Tensor, kept: list,
                    tokens: torch.Tensor):  # fmt: skip
        """Only the kept heads, channel groups and tokens computed; rows sharing a pattern share one slice."""
        after_attention, after_cross_attention, route = self.routed_tokens(tokens, kept)
        rows_pattern = torch.cat([heads, groups], 1).bool()
        if bool((rows_pattern == rows_pattern[:1]).all()):  # one timestep in the batch (sampling): one slice
            patterns, inverse = rows_pattern[:1], None
        else:
            patterns, inverse = torch.unique(rows_pattern, dim=0, return_inverse=True)

        def per_pattern(inputs: torch.Tensor, kind: str, keep: torch.Tensor | None = None) -> torch.Tensor:
            out = None
            for number, pattern in enumerate(patterns):
                rows = None if len(patterns) == 1 else (inverse == number).nonzero().squeeze(1)
                part = inputs if rows is None else inputs[rows]
                result = self.sliced_branch(block, pattern, kind, part, keep if rows is None or keep is None
                                            else keep[rows])  # fmt: skip
                if rows is None:
                    return result
                out = inputs.new_zeros(inputs.shape[0], *result.shape[1:]) if out is None else out
                out[rows] = result
            return out

        def hook(branch: Branch) -> torch.Tensor:
            if branch.kind == "cross_attention":
                return after_cross_attention(branch, branch.compute())
            inputs = branch.inputs()
            if branch.kind == "attention":
                return after_attention(branch, per_pattern(inputs, "attention"))
            keep = route(branch, inputs).bool()
            return per_pattern(inputs, "mlp", keep)

        return hook

    def sliced_branch(self, block: nn.Module, pattern: torch.Tensor, kind: str, inputs: torch.Tensor,
                      keep: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        heads, groups = pattern[: self.num_heads], pattern[self.num_heads:]
        if kind == "attention":
            if bool(heads.all()):
                return block.attn(inputs)[0]
            key = (id(block), "attention", heads.cpu().numpy().tobytes(), ops.weights_version(block.attn))
            fn = self.cached(key, lambda: ops.SlicedAttention(block.attn, heads.nonzero().squeeze(1)))
            return fn(inputs)
        if bool(groups.all()):
            fn = block.mlp
        else:
            key = (id(block), "mlp", groups.cpu().numpy().tobytes(), ops.weights_version(block.mlp))
            channels = ops.expand_groups(groups[None].float(), self.mlp_width)[0].nonzero().squeeze(1)
            fn = self.cached(key, lambda: ops.SlicedMLP(block.mlp, channels))
        return ops.gather_tokens(inputs, keep, fn)

    # ------------------------------------------------------------------------------------------- budget
    def macs(self, num_tokens: int) -> int:
        """Router overhead per image: the width routers and the timestep embedding they read (unless the exported
        table replaces them), and the token routers."""
        routers = [*self.head_routers, *self.group_routers]
        width = 0 if self.width_table is not None else self.timestep_macs + sum(r.weight.numel() for r in routers)
        tokens = sum(num_tokens * (r[0].weight.numel() + r[2].weight.numel()) for r in self.token_routers or [])
        return width + tokens

    @torch.no_grad()
    def timestep_table(self, dit: nn.Module, timesteps: torch.Tensor) -> torch.Tensor:
        """``(T, L, H + G)`` evaluation width masks at ``timesteps`` (one row each, so batch-invariant)."""
        was_training = self.training
        self.eval()
        table = self.width_table
        self.width_table = None
        try:
            heads, groups = self.width_masks(dit, timesteps.float())
        finally:
            self.width_table = table
            self.train(was_training)
        return torch.cat([heads, groups], -1).bool()


def cross_attention_macs(block: nn.Module, num_tokens: int, cond) -> int:
    """A PixArt block's cross-attention MACs per image over this call's caption tokens (0 for a DiT block)."""
    cross = getattr(block, "cross_attn", None)
    if cross is None:
        return 0
    return cross.macs(num_tokens, condition_tokens(cond))


def condition_tokens(cond) -> int:
    """Caption tokens the blocks read (0 for a class condition)."""
    return cond.tokens.shape[1] if isinstance(cond, TextCondition) else 0


@register_trunk("dydit")
def dydit_trunk(config: DiTConfig) -> DyDiTTrunk:
    plain_blocks(config, "dydit")
    return DyDiTTrunk(config, **config.trunk_options)
