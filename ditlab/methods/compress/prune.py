"""Depth and width pruning of a DiT into a smaller DiT, plus the parameter and FLOP counts that budget it.

Every function returns (or edits) a *normal* :class:`~ditlab.models.dit.DiT`: its ``config`` rebuilds it and
its state dict loads strictly, so sampling, evaluation, conversion and checkpoint reload need no special case.

- Depth (LAPTOP-Diff, arXiv 2404.11098; PPCL, arXiv 2511.16156; Amber-Image, arXiv 2602.17047): keep a subset
  of blocks. Each kept block *stands for* a contiguous segment of teacher blocks (:func:`block_groups`,
  :func:`segments`); it starts as a copy of itself, as Amber's local weight average over its segment
  [interp: uniform weights, like-named tensors], or re-initialised (the ablation).
- Width [interp]: keep the top-scoring attention heads (same count per block) and MLP channels, scored by the
  magnitude of the weights that belong only to that unit or by first-order Taylor importance ``|w * dL/dw|``.

Block indices are 0-based positions in ``dit.blocks``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT, DiTBlock

DEPTH_INITS = ("copy", "average", "random")
WIDTH_SCORES = ("magnitude", "taylor")


# --- segments ---------------------------------------------------------------------------------------


def _checked_keep(keep: Sequence[int], depth: int) -> list[int]:
    """``keep`` sorted, or a one-line ValueError naming what is wrong with it."""
    keep = [int(index) for index in keep]
    if not keep:
        raise ValueError(
            f"keep is empty; list at least one of the {depth} block indices (0..{depth - 1}) to keep"
        )
    duplicates = sorted({index for index in keep if keep.count(index) > 1})
    if duplicates:
        raise ValueError(f"keep={keep} lists blocks {duplicates} more than once; list each kept block once")
    outside = [index for index in keep if not 0 <= index < depth]
    if outside:
        raise ValueError(
            f"keep={keep} has indices {outside} outside 0..{depth - 1} for a DiT of depth {depth}"
        )
    return sorted(keep)


def block_groups(depth: int, keep: Sequence[int]) -> dict[int, list[int]]:
    """Kept block -> the pruned blocks it owns: those after it up to the next kept block.

    Blocks before the first kept block also go to the first kept block, so every block has exactly one
    owner and ``{k} | groups[k]`` is contiguous. ``block_groups(6, [1, 4]) == {1: [0, 2, 3], 4: [5]}``.
    """
    keep = _checked_keep(keep, depth)
    bounds = segments(depth, keep)
    return {
        kept: [j for j in range(first, last + 1) if j != kept] for kept, (first, last) in zip(keep, bounds)
    }


def segments(depth: int, keep: Sequence[int]) -> list[tuple[int, int]]:
    """``(first, last)`` teacher blocks (inclusive) that student block ``i`` stands for, in student order.

    Segment ``i`` runs from ``keep[i]`` to just before ``keep[i + 1]`` (the last one to ``depth - 1``); the
    first starts at block 0 so that it begins where the student's first block does, at the embedded input.
    """
    keep = _checked_keep(keep, depth)
    starts = [0, *keep[1:]]
    ends = [*(k - 1 for k in keep[1:]), depth - 1]
    return list(zip(starts, ends))


# --- building a pruned network ----------------------------------------------------------------------


def _rebuild(dit: DiT, config: DiTConfig, state_dict: Mapping[str, torch.Tensor]) -> DiT:
    """A fresh DiT from ``config`` holding ``state_dict`` (strict), on ``dit``'s device, dtype and mode."""
    reference = next(dit.parameters())
    with torch.device("meta"):
        network = DiT(config)
    network = network.to_empty(device=reference.device).to(reference.dtype)
    network.load_state_dict(state_dict)
    return network.train(dit.training)


def _block_state(dit: DiT, index: int) -> dict[str, torch.Tensor]:
    return dit.blocks[index].state_dict()


def _student_state(dit: DiT, blocks: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``dit``'s embedders and final layer with ``blocks[i]`` as the state of student block ``i``."""
    state = {key: value for key, value in dit.state_dict().items() if not key.startswith("blocks.")}
    for index, block in enumerate(blocks):
        state.update({f"blocks.{index}.{key}": value for key, value in block.items()})
    return state


def prune_depth(
    dit: DiT,
    keep: Sequence[int],
    init: str = "copy",
    weights: Mapping[int, Sequence[float]] | None = None,
    generator: torch.Generator | None = None,
    spans: Sequence[tuple[int, int]] | None = None,
) -> DiT:
    """A new DiT of depth ``len(keep)``; ``dit`` is untouched and everything outside the blocks is copied.

    ``init``: ``"copy"`` keeps the selected blocks' weights; ``"average"`` sets kept block ``k`` to
    ``sum_j w_j theta_j`` over its segment (Amber-Image's local weight averaging; ``spans[i]``, the
    ``(first, last)`` teacher blocks kept block ``i`` stands for, default :func:`segments` of ``keep``),
    uniform unless ``weights[k]`` gives one weight per segment block in index order (normalised to sum 1);
    ``"random"`` re-initialises the kept blocks with the DiT init (adaLN-Zero), for ablations.
    """
    keep = _checked_keep(keep, dit.depth)
    if init not in DEPTH_INITS:
        raise ValueError(f"unknown depth init {init!r}; choices: {list(DEPTH_INITS)}")
    spans = segments(dit.depth, keep) if spans is None else [tuple(span) for span in spans]
    if len(spans) != len(keep) or any(not first <= kept <= last for kept, (first, last) in zip(keep, spans)):
        raise ValueError(f"spans {spans} must give one (first, last) segment containing each kept block of {keep}")
    if init == "average":
        blocks = [_averaged_block(dit, kept, [j for j in range(first, last + 1) if j != kept], (weights or {}).get(kept))
                  for kept, (first, last) in zip(keep, spans)]  # fmt: skip
    else:
        blocks = [_block_state(dit, index) for index in keep]
    student = _rebuild(dit, dit.config.replace(depth=len(keep)), _student_state(dit, blocks))
    if init == "random":
        reinitialize(student, range(student.depth), generator)
    return student


def _averaged_block(dit: DiT, kept: int, group: list[int], weights: Sequence[float] | None) -> dict:
    members = sorted([kept, *group])
    weights = torch.ones(len(members)) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape != (len(members),) or weights.sum() <= 0:
        raise ValueError(f"averaging weights for block {kept} must be {len(members)} numbers with a positive sum, "
                         f"one per block of its segment {members}")  # fmt: skip
    weights = (weights / weights.sum()).tolist()
    states = [_block_state(dit, index) for index in members]
    return {key: sum(w * state[key] for w, state in zip(weights, states)) for key in states[0]}


@torch.no_grad()
def reinitialize(dit: DiT, blocks: Iterable[int], generator: torch.Generator | None = None) -> None:
    """Give ``dit.blocks[i]`` for ``i`` in ``blocks`` the DiT init in place: Xavier linears, zero adaLN.

    A re-initialised block is the identity (zero gates), so the network still runs as the others' composition.
    """
    blocks = list(blocks)
    outside = [index for index in blocks if not 0 <= index < dit.depth]
    if outside:
        raise ValueError(f"blocks {outside} are outside 0..{dit.depth - 1} for a DiT of depth {dit.depth}")
    for index in blocks:
        block: DiTBlock = dit.blocks[index]
        for module in block.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=generator)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)


# --- width --------------------------------------------------------------------------------------------


def check_width_prunable(dit: DiT) -> None:
    """Width pruning slices heads of ``full`` attention and channels of the ``dense`` MLP; refuse other kinds."""
    config = dit.config
    if (config.attention, config.mlp) != ("full", "dense"):
        raise ValueError(f"width pruning handles full attention and the dense MLP; this DiT has {config.attention!r} "
                         f"attention and a {config.mlp!r} MLP (prune its depth instead)")  # fmt: skip


def _unit_sums(block: DiTBlock, elementwise: Callable[[str, torch.Tensor], torch.Tensor]) -> tuple:
    """Sum an elementwise quantity over the parameters owned by each head ``(H,)`` and MLP channel ``(M,)``.

    A head owns its q, k and v rows of ``qkv`` (weight and bias) and its columns of ``proj``; a channel owns
    its ``fc1`` row and bias and its ``fc2`` column. Shared biases (``proj``, ``fc2``) belong to no unit.
    """
    attn, heads, head_dim = block.attn, block.attn.num_heads, block.attn.head_dim
    dim = attn.proj.out_features
    head = (elementwise("attn.qkv.weight", attn.qkv.weight).reshape(3, heads, head_dim, dim).sum((0, 2, 3))
            + elementwise("attn.qkv.bias", attn.qkv.bias).reshape(3, heads, head_dim).sum((0, 2))
            + elementwise("attn.proj.weight", attn.proj.weight).reshape(dim, heads, head_dim).sum((0, 2)))  # fmt: skip
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    channel = (elementwise("mlp.fc1.weight", fc1.weight).sum(1) + elementwise("mlp.fc1.bias", fc1.bias)
               + elementwise("mlp.fc2.weight", fc2.weight).sum(0))  # fmt: skip
    return head, channel


@torch.no_grad()
def unit_scores(
    dit: DiT, score: str = "magnitude", grads: Mapping[str, torch.Tensor] | None = None, norm: int = 2
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Importance of every head and MLP channel: per block, ``(H,)`` head and ``(M,)`` channel scores.

    ``"magnitude"``: the L-``norm`` norm of the unit's own weights; ``"taylor"``: ``sum |w * g|`` over them,
    with ``g = grads["blocks.<i>.<param>"]`` (see :func:`taylor_scores`).
    """
    check_width_prunable(dit)
    if score not in WIDTH_SCORES:
        raise ValueError(f"unknown width score {score!r}; choices: {list(WIDTH_SCORES)}")
    if score == "taylor" and grads is None:
        raise ValueError(
            "score='taylor' needs grads (param name -> dL/dw); compute them with taylor_scores()"
        )
    heads, channels = [], []
    for index, block in enumerate(dit.blocks):
        if score == "magnitude":
            head, channel = _unit_sums(block, lambda _, w: w.float().abs().pow(norm))
            head, channel = head.pow(1 / norm), channel.pow(1 / norm)
        else:

            def taylor(name: str, w: torch.Tensor, index: int = index) -> torch.Tensor:
                key = f"blocks.{index}.{name}"
                if key not in grads:
                    raise ValueError(f"grads has no entry {key!r}; pass the dict taylor_scores() returns")
                return (w.float() * grads[key].to(w.device).float()).abs()

            head, channel = _unit_sums(block, taylor)
        heads.append(head)
        channels.append(channel)
    return heads, channels


def taylor_scores(
    dit: DiT, loss_fn: Callable[[DiT, object], torch.Tensor], batches: Iterable, absolute: bool = True
) -> dict[str, torch.Tensor]:
    """Gradients for Taylor importance: param name -> mean over ``batches`` of ``dL/dw`` (``loss_fn(dit, batch)``).

    With ``absolute`` (default) each batch's gradient enters as ``|g|``, so ``|w| * mean|g|`` is the summed
    per-batch Taylor term and does not cancel on a converged network; without it, the plain mean gradient.
    ``dit``'s ``requires_grad`` flags and ``.grad`` fields are left as they were.
    """
    named = {name: p for name, p in dit.named_parameters() if name != "pos_embed"}
    flags = {name: p.requires_grad for name, p in named.items()}
    totals: dict[str, torch.Tensor] = {}
    count = 0
    try:
        for p in named.values():
            p.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(dit, batch), list(named.values()), allow_unused=True)
            for name, grad in zip(named, grads):
                if grad is not None:
                    grad = grad.abs() if absolute else grad
                    totals[name] = totals[name] + grad if name in totals else grad.detach().clone()
            count += 1
    finally:
        for name, p in named.items():
            p.requires_grad_(flags[name])
    if count == 0:
        raise ValueError("taylor_scores got no batches; pass an iterable of at least one calibration batch")
    return {name: total / count for name, total in totals.items()}


def prune_width(
    dit: DiT,
    num_heads: int | None = None,
    mlp_hidden: int | None = None,
    score: str = "magnitude",
    grads: Mapping[str, torch.Tensor] | None = None,
    norm: int = 2,
) -> DiT:
    """A new DiT keeping the ``num_heads`` top-scoring heads of every block and ``mlp_hidden`` MLP channels.

    ``None`` keeps all of that kind. Kept units stay in their original order and ``head_dim`` is unchanged
    (the attention scale too), so keeping everything reproduces ``dit`` exactly. Scores: :func:`unit_scores`.
    """
    check_width_prunable(dit)
    config = dit.config
    heads_before, channels_before, head_dim = config.num_heads, config.mlp_width, config.attention_head_dim
    num_heads = heads_before if num_heads is None else num_heads
    mlp_hidden = channels_before if mlp_hidden is None else mlp_hidden
    if not 1 <= num_heads <= heads_before:
        raise ValueError(f"num_heads={num_heads} must be in 1..{heads_before} (the heads each block has now)")
    if not 1 <= mlp_hidden <= channels_before:
        raise ValueError(f"mlp_hidden={mlp_hidden} must be in 1..{channels_before} (the MLP width now)")
    head_scores, channel_scores = unit_scores(dit, score, grads, norm)
    blocks = []
    for index, block in enumerate(dit.blocks):
        heads = head_scores[index].topk(num_heads).indices.sort().values
        channels = channel_scores[index].topk(mlp_hidden).indices.sort().values
        blocks.append(_slice_block(block, heads, channels))
    config = dit.config.replace(num_heads=num_heads, head_dim=head_dim, mlp_hidden=mlp_hidden)
    return _rebuild(dit, config, _student_state(dit, blocks))


def _slice_block(block: DiTBlock, heads: torch.Tensor, channels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The block's state restricted to ``heads`` (indices) and MLP ``channels`` (indices)."""
    state = dict(block.state_dict())
    total, head_dim = block.attn.num_heads, block.attn.head_dim
    dim = block.attn.proj.out_features
    inner = len(heads) * head_dim
    state["attn.qkv.weight"] = (
        state["attn.qkv.weight"].reshape(3, total, head_dim, dim)[:, heads].reshape(3 * inner, dim)
    )
    state["attn.qkv.bias"] = state["attn.qkv.bias"].reshape(3, total, head_dim)[:, heads].reshape(3 * inner)
    state["attn.proj.weight"] = (
        state["attn.proj.weight"].reshape(dim, total, head_dim)[:, heads].reshape(dim, inner)
    )
    state["mlp.fc1.weight"] = state["mlp.fc1.weight"][channels]
    state["mlp.fc1.bias"] = state["mlp.fc1.bias"][channels]
    state["mlp.fc2.weight"] = state["mlp.fc2.weight"][:, channels]
    return state
