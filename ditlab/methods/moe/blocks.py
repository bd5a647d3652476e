"""Mixture of Blocks: a router per group of G consecutive blocks runs k of them per image (Dense2MoE, MoB).

Dense2MoE (arXiv 2510.09094) groups a DiT's blocks and lets a small router pick, per image, which blocks of
each group to run from the timestep and condition; the others are the identity. Here [interp]: the router of a
group sees ``[mean of the tokens entering the group; cond]`` (cond = timestep + class embedding) and picks its
top-k of G blocks; a chosen block's update is weighted by a straight-through gate (value 1, gradient of the
router's softmax probability), so with ``k = G`` the network *is* the dense one and the router still learns.
A block runs only on the images that chose it, so the saving is real compute, not a mask.

It is the trunk kind ``mixture-of-blocks`` (``DiTConfig(trunk="mixture-of-blocks", trunk_options={"group_size":
G, "active": k})``), so a Mixture-of-Blocks network is a DiT like any other: training, EMA, sampling, sharding,
checkpoints and ``load_network`` treat it as one, FLOPs and activated parameters count the blocks an image runs
(:meth:`MixtureOfBlocks.per_image`), and a feature cache that follows routed trunks hooks the branches of the
blocks each image runs (``branch.rows``).
"""

from __future__ import annotations

import torch
from torch import nn

from ditlab.models.branch import BranchHook, offset_hook, rows_hook
from ditlab.models.components import register_trunk
from ditlab.models.condition import condition_vector
from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT
from ditlab.models.trunk import Trunk, unit_offsets

TRUNK = "mixture-of-blocks"


class GroupRouter(nn.Module):
    """One linear router per group: ``[pooled tokens (B, D); cond (B, D)] -> (B, G)`` logits."""

    def __init__(self, num_groups: int, group_size: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_groups, group_size, 2 * dim))
        self.bias = nn.Parameter(torch.zeros(num_groups, group_size))

    def forward(self, group: int, tokens: torch.Tensor, cond) -> torch.Tensor:
        features = torch.cat([tokens.mean(1), condition_vector(cond)], dim=-1)
        return features @ self.weight[group].to(features.dtype).t() + self.bias[group].to(features.dtype)


def block_gates(logits: torch.Tensor, active: int) -> torch.Tensor:
    """``(B, G)`` gates: 0 for blocks not in an image's top-``active``, else ``1 + p - p.detach()`` (value 1)."""
    probs = logits.float().softmax(-1)
    chosen = torch.zeros_like(probs).scatter(1, probs.topk(active, dim=-1).indices, 1.0)
    return chosen * ((probs - probs.detach()) + 1.0)  # exactly 0 or 1 in value


def gated_block(block: nn.Module, tokens: torch.Tensor, cond: torch.Tensor, gate: torch.Tensor,
                branches: BranchHook | None = None, index: int = -1) -> torch.Tensor:  # fmt: skip
    """``g * block(tokens) + (1 - g) * tokens`` per image, computing the block only where ``gate (B,)`` is nonzero;
    ``branches`` (a branch hook) is told which rows it computes for."""
    rows = gate.nonzero().squeeze(1)
    hooks = {} if branches is None else {"branches": branches, "index": index}
    if rows.numel() == len(gate):
        weight = gate.to(tokens.dtype)[:, None, None]
        return weight * block(tokens, cond, **hooks) + (1 - weight) * tokens
    # zero rows still run: every block is in the graph on every process (DDP, FSDP2 collectives stay in step)
    if branches is not None:
        hooks["branches"] = rows_hook(branches, rows)
    inputs, weight = tokens[rows], gate[rows].to(tokens.dtype)[:, None, None]
    updated = weight * block(inputs, cond[rows], **hooks) + (1 - weight) * inputs
    return tokens.index_copy(0, rows, updated)


class MixtureOfBlocks(Trunk):
    """The trunk that runs ``active`` of every ``group_size`` consecutive blocks per image."""

    branch_hooks = True
    hidden_taps = True

    def __init__(self, config: DiTConfig, group_size: int = 1, active: int = 1) -> None:
        super().__init__()
        if group_size < 1 or config.depth % group_size:
            raise ValueError(f"trunk_options.group_size={group_size} must divide the depth {config.depth} into equal "
                             "groups")  # fmt: skip
        if not 1 <= active <= group_size:
            raise ValueError(f"trunk_options.active={active} blocks per group must be in 1..group_size={group_size}")
        self.group_size, self.active = group_size, active
        self.router = GroupRouter(config.depth // group_size, group_size, config.hidden_size)
        self.last_choice: torch.Tensor | None = None
        """``(B, depth)`` 0/1: which blocks each image of the last forward ran."""

    def groups(self, depth: int) -> list[list[int]]:
        return [list(range(start, start + self.group_size)) for start in range(0, depth, self.group_size)]

    def forward(self, dit: nn.Module, tokens: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                branches: BranchHook | None = None, hidden: dict[int, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        """The routed blocks; ``hidden`` (a dict), when given, receives the tokens after every block."""
        offsets = unit_offsets(dit.blocks) if branches is not None else None
        choices, gates = [], None
        for index, block in enumerate(dit.blocks):
            group, position = divmod(index, self.group_size)
            if position == 0:
                gates = block_gates(self.router(group, tokens, cond), self.active)
                choices.append(gates != 0)
            hook = None if branches is None else offset_hook(branches, offsets[index])
            tokens = gated_block(block, tokens, cond, gates[:, position], hook, index)
            if hidden is not None:
                hidden[index] = tokens
        self.last_choice = torch.cat(choices, dim=1).detach()
        return tokens

    def macs(self, num_tokens: int) -> int:
        """The group routers (one linear on the pooled tokens and the condition per group)."""
        return self.router.weight.numel()

    def per_image(self, per_block: list[int]) -> int:
        """Of a per-block quantity (MACs, parameters), what one image uses: every group minus its ``G - k``
        cheapest blocks (exact when the blocks of a group cost the same, as in a carved or uniform DiT)."""
        skipped = self.group_size - self.active
        groups = self.groups(len(per_block))
        return sum(per_block) - sum(sum(sorted(per_block[i] for i in group)[:skipped]) for group in groups)


register_trunk(TRUNK)(lambda config: MixtureOfBlocks(config, **config.trunk_options))


def mixture_of_blocks(dit: DiT, group_size: int, active: int, scores: torch.Tensor | None = None) -> DiT:
    """``dit``'s weights (copied) under a Mixture-of-Blocks trunk; ``scores (depth,)`` (block importance, higher =
    keep) start each router's bias, so the mixture begins by running the most important blocks of every group.
    A network that already has the trunk keeps its routers and changes ``active``."""
    routed = dit.config.trunk == TRUNK
    config = dit.config.replace(trunk=TRUNK, trunk_options={"group_size": group_size, "active": active})
    reference = next(dit.parameters())
    with torch.device("meta"):
        mixture = DiT(config)
    mixture = mixture.to_empty(device=reference.device).to(reference.dtype)
    weights = dit.state_dict()
    if not routed:
        weights["trunk.router.weight"] = torch.zeros_like(mixture.trunk.router.weight)
        weights["trunk.router.bias"] = torch.zeros_like(mixture.trunk.router.bias)
    if scores is not None:
        scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1, group_size)
        spread = (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp_min(1e-8)
        weights["trunk.router.bias"] = spread.to(weights["trunk.router.bias"])
    mixture.load_state_dict(weights)
    return mixture.train(dit.training)
