"""Mixture of Blocks: a router per group of G consecutive blocks runs k of them per image (Dense2MoE, MoB).

Dense2MoE (arXiv 2510.09094) groups a DiT's blocks and lets a small router pick, per image, which blocks of
each group to run from the timestep and condition; the others are the identity. Here [interp]: the router of a
group sees ``[mean of the tokens entering the group; cond]`` (cond = timestep + class embedding) and picks its
top-k of G blocks; a chosen block's update is weighted by a straight-through gate (value 1, gradient of the
router's softmax probability), so with ``k = G`` the network *is* the dense one and the router still learns.
A block runs only on the images that chose it, so the saving is real compute, not a mask.

:class:`MixtureOfBlocks` is a :class:`~ditlab.models.dit.DiT` (so training, EMA, sampling, sharding and FLOP
counting treat it as one); its config adds ``group_size`` and ``active``. ``load_network`` reads only plain DiT
checkpoints; :func:`load_mixture_of_blocks` reads the ones a Dense2MoE run writes in its Mixture-of-Blocks stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ditlab.models import budget
from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT, DiTBlock
from ditlab.models.taps import Tapped, run_blocks

MOB_KEYS = ("group_size", "active")


@dataclass
class MixtureOfBlocksConfig(DiTConfig):
    """A :class:`DiTConfig` whose blocks form groups of ``group_size``, ``active`` of each group running per image."""

    group_size: int = 1
    active: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 1 or self.depth % self.group_size:
            raise ValueError(f"group_size={self.group_size} must divide the depth {self.depth} into equal groups")
        if not 1 <= self.active <= self.group_size:
            raise ValueError(f"active={self.active} blocks per group must be in 1..group_size={self.group_size}")

    @property
    def num_groups(self) -> int:
        return self.depth // self.group_size

    def replace(self, **changes) -> MixtureOfBlocksConfig:
        return type(self).from_dict({**self.to_dict(), **changes})

    def build(self) -> MixtureOfBlocks:
        return MixtureOfBlocks(self)

    def dit_config(self) -> DiTConfig:
        """The plain DiT this mixture runs (all its blocks)."""
        return DiTConfig.from_dict({k: v for k, v in self.to_dict().items() if k not in MOB_KEYS})


class GroupRouter(nn.Module):
    """One linear router per group: ``[pooled tokens (B, D); cond (B, D)] -> (B, G)`` logits."""

    def __init__(self, num_groups: int, group_size: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_groups, group_size, 2 * dim))
        self.bias = nn.Parameter(torch.zeros(num_groups, group_size))

    def forward(self, group: int, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        features = torch.cat([tokens.mean(1), cond], dim=-1)
        return features @ self.weight[group].to(features.dtype).t() + self.bias[group].to(features.dtype)


def block_gates(logits: torch.Tensor, active: int) -> torch.Tensor:
    """``(B, G)`` gates: 0 for blocks not in an image's top-``active``, else ``1 + p - p.detach()`` (value 1)."""
    probs = logits.float().softmax(-1)
    chosen = torch.zeros_like(probs).scatter(1, probs.topk(active, dim=-1).indices, 1.0)
    return chosen * ((probs - probs.detach()) + 1.0)  # exactly 0 or 1 in value


def gated_block(block: DiTBlock, tokens: torch.Tensor, cond: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``g * block(tokens) + (1 - g) * tokens`` per image, computing the block only where ``gate (B,)`` is nonzero."""
    rows = gate.nonzero().squeeze(1)
    if rows.numel() == len(gate):
        weight = gate.to(tokens.dtype)[:, None, None]
        return weight * block(tokens, cond) + (1 - weight) * tokens
    # zero rows still run: every block is in the graph on every process (DDP, FSDP2 collectives stay in step)
    inputs, weight = tokens[rows], gate[rows].to(tokens.dtype)[:, None, None]
    updated = weight * block(inputs, cond[rows]) + (1 - weight) * inputs
    return tokens.index_copy(0, rows, updated)


class MixtureOfBlocks(DiT):
    """A DiT that runs ``config.active`` of every ``config.group_size`` consecutive blocks per image."""

    def __init__(self, config: MixtureOfBlocksConfig) -> None:
        if not isinstance(config, MixtureOfBlocksConfig):
            raise TypeError("MixtureOfBlocks needs a MixtureOfBlocksConfig; build one from a DiT with from_dit()")
        super().__init__(config)
        self.block_router = GroupRouter(config.num_groups, config.group_size, config.hidden_size)
        self.last_choice: torch.Tensor | None = None
        """``(B, depth)`` 0/1: which blocks each image of the last forward ran."""

    @classmethod
    def from_dit(cls, dit: DiT, group_size: int, active: int, scores: torch.Tensor | None = None) -> MixtureOfBlocks:
        """``dit``'s weights (copied) with a group router; ``scores (depth,)`` (block importance, higher = keep)
        start each router's bias, so the mixture begins by running the most important blocks of every group."""
        config = MixtureOfBlocksConfig(**dit.config.to_dict(), group_size=group_size, active=active)
        reference = next(dit.parameters())
        with torch.device("meta"):
            mixture = cls(config)
        mixture = mixture.to_empty(device=reference.device).to(reference.dtype)
        router = {"block_router.weight": torch.zeros_like(mixture.block_router.weight),
                  "block_router.bias": torch.zeros_like(mixture.block_router.bias)}  # fmt: skip
        if scores is not None:
            scores = torch.as_tensor(scores, dtype=torch.float32).reshape(config.num_groups, group_size)
            spread = (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp_min(1e-8)
            router["block_router.bias"] = spread.to(router["block_router.bias"])
        mixture.load_state_dict({**dit.state_dict(), **router})
        return mixture.train(dit.training)

    @property
    def groups(self) -> list[list[int]]:
        size = self.config.group_size
        return [list(range(start, start + size)) for start in range(0, self.depth, size)]

    def tapped(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, hidden=(),
               force_drop_ids: torch.Tensor | None = None) -> Tapped:  # fmt: skip
        """The routed forward through :func:`~ditlab.models.taps.run_blocks`, with tokens after ``hidden`` blocks."""
        size, active = self.config.group_size, self.config.active
        gates: dict[int, torch.Tensor] = {}

        def routed(index: int):
            group, position = divmod(index, size)

            def run(tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
                if position == 0:
                    gates[group] = block_gates(self.block_router(group, tokens, cond), active)
                return gated_block(self.blocks[index], tokens, cond, gates[group][:, position])

            return run

        result = run_blocks(self, x, t, y, hidden=hidden, replace={i: routed(i) for i in range(self.depth)},
                            force_drop_ids=force_drop_ids)  # fmt: skip
        self.last_choice = torch.cat([gates[g] != 0 for g in range(len(gates))], dim=1).detach()
        return result

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        return self.tapped(x, t, y, force_drop_ids=force_drop_ids).output

    # ----------------------------------------------------------------------------------- accounting
    def skipped_cost(self, per_block: list[int]) -> int:
        """Sum over groups of the cheapest ``G - k`` blocks' cost: what every image skips at least (exact when the
        blocks of a group cost the same, as in a carved or uniform DiT)."""
        skipped = self.config.group_size - self.config.active
        return sum(sum(sorted(per_block[i] for i in group)[:skipped]) for group in self.groups)

    def flops_per_image(self) -> int:
        """Forward FLOPs per image: the whole DiT minus the blocks an image skips, plus the group routers."""
        tokens = self.x_embedder.num_patches
        per_block = [block.macs(tokens, self.config) for block in self.blocks]
        return budget.flops_per_image(self) - 2 * self.skipped_cost(per_block) + 2 * self.block_router.weight.numel()

    def activated_parameters(self) -> int:
        """Parameters an image uses: everything outside the blocks, its active blocks (the largest k per group)."""
        outside = sum(p.numel() for p in self.parameters(recurse=False))
        outside += sum(budget.activated_parameter_count(child) for name, child in self.named_children() if name != "blocks")
        per_block = [budget.activated_parameter_count(block) for block in self.blocks]
        return outside + sum(per_block) - self.skipped_cost(per_block)


def load_mixture_of_blocks(path: str | Path, use_ema: bool = True) -> MixtureOfBlocks:
    """The routed network of a Dense2MoE checkpoint written in its Mixture-of-Blocks stage (EMA weights by default)."""
    from ditlab.models.loading import load_matching, read_checkpoint

    checkpoint = read_checkpoint(path)
    mob = checkpoint.get("dense2moe", {}).get("mixture_of_blocks")
    if mob is None:
        raise ValueError(f"{path} has no Mixture-of-Blocks stage; load it with ditlab.models.loading.load_network")
    config = MixtureOfBlocksConfig(**checkpoint["ditlab"]["dit_config"], **mob)
    network = MixtureOfBlocks(config)
    state = checkpoint["state_dict"]
    prefix = "ema." if use_ema and any(key.startswith("ema.") for key in state) else "network."
    load_matching(network, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, str(path))
    return network.eval()
