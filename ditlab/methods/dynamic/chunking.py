"""Dynamic chunking: the trunk runs on the tokens a router keeps and writes its result back to every position
(DC-DiT, Haridas et al., arXiv 2603.06351; code AMD-AGI/DynamicChunkingDiT; H-Net's chunking, Hwang et al. 2025).

A router scores every token on the 2-D grid: a 1x1 conv to ``D/4``, a 3x3 "context predictor" whose error
``a - predict(a)`` is what the scorer sees (conv 3x3 -> GroupNorm -> SiLU -> conv 1x1 -> sigmoid, in fp32), so
tokens that their neighbours predict poorly (edges, detail) score high. The first and last positions are always
kept; a token is a boundary iff ``p > 0.5``. The kept tokens (raster order, position embedding included) run
through every block; the dechunker (:func:`dechunk`) smooths them with Gaussian neighbours weighted by their
``p`` (``p z + (1 - p) sum_j w_j z_j``), copies each original position from its nearest kept token in 2-D,
multiplies each position by ``STE(c)``, ``c`` the probability of that position's own decision (forward value 1,
gradient to the router) and adds a zero-initialised ``W_res`` of the trunk's input. With every token kept and
smoothing off this is the plain DiT. The dechunker reproduces the reference's outputs and router gradients
(``tests/methods/dynamic/data/dcdit_reference.json``); before that fix every position's gradient went to the
``p`` of the kept token it copies (router gradient 0.70 relative L2 from the reference's, half the signs wrong)
and neighbours were not weighted by ``p`` (output 0.12 relative L2).

Sequences of different lengths run padded to the longest kept length with padded keys masked in attention, the
CPU fallback of the paper's flash-attn varlen packing (no packed kernel here). [interp] The router works on the
embedded tokens of the DiT's own patch embedding, where DC-DiT uses patch size 1 and conv encoder/decoder stages,
so a plain DiT checkpoint can be upcycled; multi-budget tail dropping and Lite-CFG are not implemented.

Read against the paper (arXiv 2603.06351 v2, Sec. 3 and Table 6) and the authors' code, AMD-AGI/DynamicChunkingDiT
at b939538ba4839fb58cf4ea4abd4fa882ec114efa (``hnet/hnet/modules/dc.py``, ``hnet/utils/train.py``, ``train.py``,
``config.py``; the later commits add only repository files): the ratio loss and its groups of 16
(``load_balancing_loss``), weight 0.03, smoothing sigma 1, uniform timesteps, one AdamW group at 1e-4. Upcycling
(v2 Sec. 4.4, Z-Image; v1 upcycled DiT-XL/2 the same way over 50K steps) keeps the pretrained blocks, freezes the
timestep and condition embedders (here ``DynamicConfig.freeze: [t_embedder, y_embedder]``), adds a LayerNorm
adaptor to the conv stages' conditioning (no conv stages here) and starts with 5K steps of grafting-style
distillation towards the frozen model, which is not implemented here. The code has no upcycling path; its
``ChunkLayer``/``DeChunkLayer`` and H-Net's STE were run on a fixed input to record the golden outputs above (the
full model needs flash-attn).

Upcycling measured on digits (``bench/dynamic.py``, README "dynamic"): on the 16-token teacher (4x4 patches) the
ratio loss at DC-DiT's weight 0.03 loses to the diffusion loss's straight-through pull and the router keeps every
token (at every logged step of a 200-step run), and at 10x the weight it keeps half at twice the teacher's FID: a patch there is a sixteenth
of the digit, and a dropped one sees nothing of it but ``W_res``. On the 64-token teacher (2x2 patches, much of it
background) the paper's weight keeps about 60% of the tokens at the teacher's FID.

PixArt blocks run on the kept tokens as DiT's do (their cross-attention reads the caption for each kept token;
padded chunk rows are masked as keys of the self-attention only, since they are never keys of the
cross-attention). MM-DiT blocks are refused (:func:`~ditlab.methods.dynamic.routing.plain_blocks`).
"""

from __future__ import annotations

import torch
from torch import nn

from ditlab.methods.dynamic import ops
from ditlab.methods.dynamic.routing import Decisions, DynamicTrunk, plain_blocks, straight_through
from ditlab.models.branch import Branch
from ditlab.models.components import register_trunk
from ditlab.models.config import DiTConfig


class ChunkRouter(nn.Module):
    """Boundary probabilities ``(B, N)`` of tokens on a ``grid x grid`` layout."""

    def __init__(self, dim: int, bias: float) -> None:
        super().__init__()
        inner = max(4, dim // 4)
        self.reduce = nn.Conv2d(dim, inner, 1)
        self.predict = nn.Conv2d(inner, inner, 3, padding=1)
        self.score = nn.Sequential(nn.Conv2d(inner, inner, 3, padding=1), nn.GroupNorm(min(8, inner), inner),
                                   nn.SiLU(), nn.Conv2d(inner, 1, 1))  # fmt: skip
        nn.init.constant_(self.score[-1].bias, bias)

    def forward(self, tokens: torch.Tensor, grid: int) -> torch.Tensor:
        with torch.autocast(tokens.device.type, enabled=False):
            maps = tokens.float().transpose(1, 2).reshape(len(tokens), -1, grid, grid)
            reduced = self.reduce(maps)
            p = torch.sigmoid(self.score(reduced - self.predict(reduced))).flatten(1)
        ends = torch.zeros_like(p, dtype=torch.bool)
        ends[:, 0] = ends[:, -1] = True
        return torch.where(ends, torch.ones_like(p), p)

    def macs(self, num_tokens: int) -> int:
        convs = [self.reduce, self.predict, self.score[0], self.score[-1]]
        return num_tokens * sum(conv.weight.numel() for conv in convs)


def chunk_indices(boundary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions in raster order, padded: ``index (B, K)`` and ``valid (B, K)`` with ``K`` the longest count."""
    length = boundary.shape[1]
    order = torch.arange(length, device=boundary.device)
    key = torch.where(boundary, order, order + length)
    count = int(boundary.sum(1).max())
    index = key.argsort(dim=1)[:, :count]
    valid = torch.arange(count, device=boundary.device)[None] < boundary.sum(1, keepdim=True)
    return index, valid


def grid_positions(index: torch.Tensor, grid: int) -> torch.Tensor:
    """``(..., 2)`` (row, column) of raster positions ``index``."""
    return torch.stack([torch.div(index, grid, rounding_mode="floor"), index % grid], -1).float()


def nearest_kept(index: torch.Tensor, valid: torch.Tensor, grid: int) -> torch.Tensor:
    """``(B, N)``: for every position, the slot (into ``index``) of its nearest kept token in 2-D; ties go to the
    earliest in raster order."""
    every = grid_positions(torch.arange(grid * grid, device=index.device), grid)
    kept = grid_positions(index, grid)
    distance = ((every[None, :, None, :] - kept[:, None, :, :]) ** 2).sum(-1)
    distance = distance.masked_fill(~valid[:, None, :], float("inf"))
    return distance.argmin(-1)


P_CLAMP = 1e-4
"""The dechunker clamps boundary probabilities to ``[P_CLAMP, 1 - P_CLAMP]`` before smoothing (DC-DiT's ``dc.py``)."""


def dechunk(chunk: torch.Tensor, p: torch.Tensor, boundary: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
            grid: int, smoothing: float) -> torch.Tensor:  # fmt: skip
    """Every position's value from the trunk's output on the kept tokens, with the router's straight-through gradient.

    ``chunk (B, K, D)`` are the kept tokens' outputs (``index``/``valid`` from :func:`chunk_indices`), ``p (B, N)``
    the boundary probabilities and ``boundary`` their decisions. As DC-DiT's ``DeChunkLayer`` and H-Net's residual:

    - smoothing: ``p_i z_i + (1 - p_i) sum_j w_ij z_j`` with ``w_ij`` proportional to ``exp(-d_ij^2 / 2 sigma^2) p_j``
      over the kept tokens, ``i`` itself included, ``p`` clamped to ``[1e-4, 1 - 1e-4]``; ``smoothing=0`` skips it;
    - plug-back: each position copies its nearest kept token in 2-D;
    - each position is multiplied by ``STE(c)``, ``c`` the probability of its own decision (``p`` where kept,
      ``1 - p`` where dropped): forward value 1, so a dropped position's loss gradient reaches its own router score.
    """
    if smoothing > 0:
        kept_p = p.gather(1, index).clamp(P_CLAMP, 1 - P_CLAMP).to(chunk.dtype)
        positions = grid_positions(index, grid)
        distance = ((positions[:, :, None] - positions[:, None]) ** 2).sum(-1)
        weights = torch.exp(-distance / (2 * smoothing**2)).to(chunk.dtype) * kept_p[:, None, :]
        weights = weights * (valid[:, None, :] & valid[:, :, None])
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-8)
        p_self = kept_p.unsqueeze(-1)
        chunk = p_self * chunk + (1 - p_self) * (weights @ chunk)
    source = nearest_kept(index, valid, grid)
    out = chunk.gather(1, source[..., None].expand(-1, -1, chunk.shape[-1]))
    confidence = torch.where(boundary, p, 1 - p)
    return out * straight_through(torch.ones_like(confidence), confidence).unsqueeze(-1).to(out.dtype)


class ChunkingTrunk(DynamicTrunk):
    """The blocks on the router's kept tokens; options are ``DiTConfig.trunk_options``.

    Args:
        router_bias: initial bias of the scorer's last conv (DC-DiT from scratch: -1.1; upcycling a trained DiT
            starts near 0 so that about half the tokens are kept and the trunk still sees a sensible sequence).
        smoothing: sigma (in grid cells) of the dechunker's Gaussian smoothing among kept tokens; 0 turns it off.
    """

    forms = ("sliced", "masked")

    def __init__(self, config: DiTConfig, router_bias: float = -1.1, smoothing: float = 1.0) -> None:
        super().__init__()
        if smoothing < 0:
            raise ValueError(f"trunk_options.smoothing={smoothing} must be >= 0 (0 turns smoothing off)")
        self.grid, self.smoothing = config.grid_size, float(smoothing)
        self.router = ChunkRouter(config.hidden_size, router_bias)
        self.residual = nn.Linear(config.hidden_size, config.hidden_size)
        nn.init.zeros_(self.residual.weight)
        nn.init.zeros_(self.residual.bias)
        self.force_keep_all = False
        """Keep every token whatever the router says (the identity checks)."""

    def forward(self, dit: nn.Module, tokens: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return self.run_plain(dit, tokens, cond)
        length = tokens.shape[1]
        p = self.router(tokens, self.grid)
        if self.force_keep_all:
            p = torch.ones_like(p)
        boundary = p > 0.5
        index, valid = chunk_indices(boundary)
        chunk = tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))
        key_mask = None if bool(valid.all()) else valid
        if self.form == "masked" and not self.training:  # reference: padded keys masked, nothing else different
            key_mask = valid
        hook = self.masked_attention_hook(dit, key_mask)
        for index_block, block in enumerate(dit.blocks):
            ops.check_plain_components(block, index_block, "dynamic chunking")
            chunk = block(chunk, cond, branches=hook, index=index_block)
        smoothing = 0.0 if self.force_keep_all else self.smoothing
        out = dechunk(chunk, p, boundary, index, valid, self.grid, smoothing)
        out = out + self.residual(tokens)
        kept = boundary.sum(1)
        full = self.dense_block_macs(dit, length)
        spent = torch.tensor([self.dense_block_macs(dit, int(k)) for k in kept.tolist()], device=tokens.device)
        self.last = Decisions(full - spent, full, {"kept": kept.float() / length, "p": p, "boundary": boundary})
        return out

    @staticmethod
    def masked_attention_hook(dit: nn.Module, key_mask: torch.Tensor | None):
        def hook(branch: Branch) -> torch.Tensor:
            if branch.kind == "attention" and key_mask is not None:
                return ops.attention(dit.blocks[branch.block].attn, branch.inputs(), key_mask=key_mask)
            return branch.compute()

        return hook

    def budget_terms(self, decisions: Decisions, dynamic, levels) -> dict[str, torch.Tensor]:
        """DC-DiT's ratio loss (the router keeps about ``chunk_target`` of the tokens) and the kept share."""
        if not dynamic.ratio_weight:
            return {}
        details = decisions.details
        return {"loss_ratio": dynamic.ratio_weight * ratio_loss(details["boundary"], details["p"], dynamic.chunk_target,
                                                                dynamic.ratio_group),
                "kept_tokens": details["kept"].mean()}  # fmt: skip

    def macs(self, num_tokens: int) -> int:
        return self.router.macs(num_tokens) + num_tokens * self.residual.weight.numel()


def ratio_loss(boundary: torch.Tensor, p: torch.Tensor, target: float, group: int = 16) -> torch.Tensor:
    """H-Net's ratio loss for a downsampling factor ``target`` (N): ``((1-F)(1-G) + F G (N-1)) N/(N-1)`` with
    ``F`` the selected fraction and ``G`` the mean probability, averaged over groups of ``group`` samples. Its
    minimum in ``G`` is 1, at ``F = G = 1/N``."""
    if target <= 1:
        raise ValueError(f"model.chunking.target={target} must exceed 1 (the sequence is shortened N-fold)")
    groups = [slice(start, start + group) for start in range(0, len(p), group)]
    losses = []
    for rows in groups:
        selected = boundary[rows].float().mean()
        mean_p = p[rows].mean()
        losses.append(((1 - selected) * (1 - mean_p) + selected * mean_p * (target - 1)) * target / (target - 1))
    return torch.stack(losses).mean()


@register_trunk("chunking")
def chunking_trunk(config: DiTConfig) -> ChunkingTrunk:
    plain_blocks(config, "chunking")
    return ChunkingTrunk(config, **config.trunk_options)
