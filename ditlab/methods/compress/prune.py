"""Depth and width pruning of a DiT into a smaller DiT, plus the parameter and FLOP counts that budget it.

Every function returns (or edits) a *normal* :class:`~ditlab.models.dit.DiT`: its ``config`` rebuilds it and
its state dict loads strictly, so sampling, evaluation, conversion and checkpoint reload need no special case.

- Depth (LAPTOP-Diff, arXiv 2404.11098; PPCL, arXiv 2511.16156; Amber-Image, arXiv 2602.17047): keep a subset
  of blocks. Each kept block *stands for* a contiguous segment of teacher blocks (:func:`block_groups`,
  :func:`segments`); it starts as a copy of itself, as Amber's local weight average over its segment
  [interp: uniform weights, like-named tensors of blocks of the kept block's own kind], or re-initialised (the
  ablation).
- Width [interp]: keep the top-scoring attention heads (same count per block) and MLP channels, scored by the
  magnitude of the weights that belong only to that unit or by first-order Taylor importance ``|w * dL/dw|``.

Text-to-image blocks (``ditlab.models.blocks``; PixArt-alpha, Chen et al. 2023; SD3's MM-DiT, Esser et al. 2024;
FLUX.1) prune the same way:

- Depth: the kept blocks keep their weights, so a pruned network computes exactly what the original computes with
  the dropped blocks skipped. FLUX's double- and single-stream blocks keep their order (a double-stream block never
  follows a single-stream one), and the student's ``block_options.double`` counts its kept double-stream blocks.
  In an SD3 stack whose last block is context-pre-only (``block_options.context_pre_only``), a kept block that
  becomes the last one is cut to that form (its text MLP, text output projection and text gates dropped, its text
  shift/scale kept): nothing reads the text stream after the last block, so the network's output is unchanged.
- Width: every head and channel *family* of a block is ranked on its own (:func:`width_families`): the
  self-attention heads, PixArt's cross-attention heads, the MM-DiT joint-attention heads (a head owns its rows and
  columns in both streams' projections, since the streams attend jointly per head), the image MLP and the MM-DiT
  text stream's MLP. [interp] One ``DiTConfig`` gives every family of a kind one count (``num_heads`` for heads,
  ``mlp_hidden`` for channels), so a cross-attention head count or a text-MLP width other than the self-attention's
  or the image MLP's is refused in one line (the core would need a field for it).

Block indices are 0-based positions in ``dit.blocks``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ditlab.models.blocks.flux import FluxSingleBlock
from ditlab.models.blocks.mmdit import MMDiTBlock
from ditlab.models.blocks.pixart import PixArtBlock
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


# --- block kinds --------------------------------------------------------------------------------------


def block_form(block: nn.Module) -> str:
    """How pruning sees a block: ``dit``, ``pixart``, ``mmdit`` (SD3 / FLUX double-stream), ``mmdit-pre`` (SD3's
    context-pre-only last block), ``flux-single``, or the class name of another kind."""
    if isinstance(block, MMDiTBlock):
        return "mmdit-pre" if block.context_pre_only else "mmdit"
    for kind, form in ((PixArtBlock, "pixart"), (FluxSingleBlock, "flux-single"), (DiTBlock, "dit")):
        if isinstance(block, kind):
            return form
    return type(block).__name__


def stream_kind(block: nn.Module) -> str:
    """``double`` for a block with separate text and image weights (MM-DiT), ``single`` for one sequence with one
    set of weights (FLUX's single-stream block), ``image`` for a block of image tokens only (DiT, PixArt)."""
    if isinstance(block, MMDiTBlock):
        return "double"
    return "single" if isinstance(block, FluxSingleBlock) else "image"


def stack_config(dit: DiT, blocks: Sequence[nn.Module]) -> DiTConfig:
    """The config of ``dit`` rebuilt with ``blocks`` (modules of ``dit``'s kind, in order) as its blocks: the depth,
    and for FLUX the number of leading double-stream blocks (refused in one line when one follows a single block)."""
    config = dit.config.replace(depth=len(blocks))
    if config.block == "flux":
        kinds = [stream_kind(block) for block in blocks]
        double = kinds.count("double")
        if kinds[:double] != ["double"] * double:
            raise ValueError(f"a FLUX network runs its double-stream blocks before its single-stream ones; these "
                             f"blocks would be {kinds}")  # fmt: skip
        config = config.replace(block_options={**config.block_options, "double": double})
    return config


def context_pre_only_state(state: Mapping[str, torch.Tensor], prefix: str, hidden_size: int) -> dict:
    """An ``mmdit`` block's state (keys under ``prefix``) cut to SD3's context-pre-only last block: no text MLP,
    no text output projection, text modulation reduced to its attention shift and scale (the first ``2 D`` rows).
    The image output of the block is unchanged; its text output (which nothing after the last block reads) is."""
    dropped = (f"{prefix}context_mlp.", f"{prefix}attn.context_proj.")
    result = {key: value for key, value in state.items() if not key.startswith(dropped)}
    for name in ("weight", "bias"):
        key = f"{prefix}context_adaLN_modulation.1.{name}"
        result[key] = result[key][: 2 * hidden_size]
    return result


def _conformed(network: DiT, state: Mapping[str, torch.Tensor]) -> dict:
    """``state`` with every full ``mmdit`` block that stands where ``network`` has a context-pre-only block cut to
    that form; a context-pre-only block anywhere else is refused in one line."""
    state = dict(state)
    for index, block in enumerate(network.blocks):
        prefix = f"blocks.{index}."
        if not isinstance(block, MMDiTBlock):
            continue
        full = f"{prefix}attn.context_proj.weight" in state
        if block.context_pre_only and full:
            state = context_pre_only_state(state, prefix, network.config.hidden_size)
        elif not block.context_pre_only and not full and f"{prefix}attn.context_qkv.weight" in state:
            raise ValueError(f"block {index} would hold SD3's context-pre-only last block (it has no text MLP or text "
                             "output projection) but is not the last block; keep the context-pre-only block last")  # fmt: skip
    return state


# --- building a pruned network ----------------------------------------------------------------------


def _rebuild(dit: DiT, config: DiTConfig, state_dict: Mapping[str, torch.Tensor]) -> DiT:
    """A fresh DiT from ``config`` holding ``state_dict`` (strict), on ``dit``'s device, dtype and mode.

    Block states are first fitted to the positions they land on (:func:`_conformed`: a full MM-DiT block that
    becomes a context-pre-only last block is cut to that form)."""
    reference = next(dit.parameters())
    with torch.device("meta"):
        network = DiT(config)
    state_dict = _conformed(network, state_dict)
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
    [interp] only segment blocks of the kept block's own kind enter the average (a FLUX segment may span double-
    and single-stream blocks), each tensor over the members that hold it in the same shape;
    ``"random"`` re-initialises the kept blocks with their kind's init (DiT / MM-DiT / FLUX: adaLN-Zero), for
    ablations.
    """
    keep = _checked_keep(keep, dit.depth)
    if init not in DEPTH_INITS:
        raise ValueError(f"unknown depth init {init!r}; choices: {list(DEPTH_INITS)}")
    spans = segments(dit.depth, keep) if spans is None else [tuple(span) for span in spans]
    if len(spans) != len(keep) or any(not first <= kept <= last for kept, (first, last) in zip(keep, spans)):
        raise ValueError(f"spans {spans} must give one (first, last) segment containing each kept block of {keep}")
    if init == "average":
        # SD3's last block is context-pre-only: the student's last block is averaged in that form
        pre_only = dit.config.block == "mmdit" and bool(dit.config.block_options.get("context_pre_only"))
        blocks = [_averaged_block(dit, kept, [j for j in range(first, last + 1) if j != kept], (weights or {}).get(kept),
                                  pre_only and position == len(keep) - 1)
                  for position, (kept, (first, last)) in enumerate(zip(keep, spans))]  # fmt: skip
    else:
        blocks = [_block_state(dit, index) for index in keep]
    config = stack_config(dit, [dit.blocks[index] for index in keep])
    student = _rebuild(dit, config, _student_state(dit, blocks))
    if init == "random":
        reinitialize(student, range(student.depth), generator)
    return student


def _averaged_block(dit: DiT, kept: int, group: list[int], weights: Sequence[float] | None,
                    pre_only: bool = False) -> dict:  # fmt: skip
    """Kept block ``kept``'s state averaged over its segment (``kept`` and ``group``); ``pre_only``: the block lands
    in a context-pre-only position, so every MM-DiT member is averaged in that form."""
    members = sorted([kept, *group])
    weights = torch.ones(len(members)) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape != (len(members),) or weights.sum() <= 0:
        raise ValueError(f"averaging weights for block {kept} must be {len(members)} numbers with a positive sum, "
                         f"one per block of its segment {members}")  # fmt: skip
    hidden = dit.config.hidden_size
    pre_only = pre_only or block_form(dit.blocks[kept]) == "mmdit-pre"
    states = {}
    for index in members:
        if type(dit.blocks[index]) is not type(dit.blocks[kept]):
            continue  # [interp] a block of another kind (FLUX double vs single) has other weights: not averaged in
        state = _block_state(dit, index)
        if pre_only and block_form(dit.blocks[index]) == "mmdit":
            state = context_pre_only_state(state, "", hidden)
        states[index] = state
    target = states[kept]
    averaged = {}
    for key, value in target.items():
        holders = [i for i in members if i in states and key in states[i] and states[i][key].shape == value.shape]
        total = sum(float(weights[members.index(i)]) for i in holders)
        if total <= 0:
            averaged[key] = value.clone()
            continue
        averaged[key] = sum(float(weights[members.index(i)]) / total * states[i][key] for i in holders)
    return averaged


@torch.no_grad()
def reinitialize(dit: DiT, blocks: Iterable[int], generator: torch.Generator | None = None) -> None:
    """Give ``dit.blocks[i]`` for ``i`` in ``blocks`` their kind's init in place: Xavier linears with zero biases,
    then the block's own ``initialize()`` (MM-DiT, FLUX: zero adaLN; PixArt: a fresh table and a zero
    cross-attention output) or, for DiT's block, zero adaLN.

    A re-initialised DiT, MM-DiT or FLUX block is the identity (zero gates), so the network still runs as the others'
    composition; a PixArt block is not (adaLN-single has no zero gate; its table is drawn from the global RNG).
    """
    blocks = list(blocks)
    outside = [index for index in blocks if not 0 <= index < dit.depth]
    if outside:
        raise ValueError(f"blocks {outside} are outside 0..{dit.depth - 1} for a DiT of depth {dit.depth}")
    for index in blocks:
        block = dit.blocks[index]
        for module in block.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=generator)
                nn.init.zeros_(module.bias)
        if callable(getattr(block, "initialize", None)):
            block.initialize()
        else:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)


# --- width --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Part of a parameter that belongs to units: dimension ``dim`` of ``name`` (a path in the block) holds
    ``outer`` groups (3 for a fused qkv, 2 for a fused kv) of ``units`` x ``inner`` rows (``inner``: the head
    width for heads, 1 for channels)."""

    name: str
    dim: int
    outer: int = 1
    inner: int = 1

    def view(self, tensor: torch.Tensor, units: int) -> torch.Tensor:
        shape = tensor.shape
        return tensor.reshape(*shape[: self.dim], self.outer, units, self.inner, *shape[self.dim + 1 :])

    def sums(self, values: torch.Tensor, units: int) -> torch.Tensor:
        """``(units,)``: ``values`` (shaped like the parameter) summed over everything but the unit axis."""
        viewed = self.view(values, units)
        return viewed.transpose(0, self.dim + 1).reshape(units, -1).sum(1)

    def select(self, tensor: torch.Tensor, units: int, kept: torch.Tensor) -> torch.Tensor:
        shape = tensor.shape
        chosen = self.view(tensor, units).index_select(self.dim + 1, kept.to(tensor.device))
        return chosen.reshape(*shape[: self.dim], -1, *shape[self.dim + 1 :])


@dataclass(frozen=True)
class Family:
    """Units ranked together: ``kind`` is ``heads`` (count ``num_heads``) or ``channels`` (count ``mlp_hidden``)."""

    name: str
    kind: str
    pieces: tuple[Piece, ...]


def _heads(prefix: str, head_dim: int, fused: str = "qkv", outer: int = 3, out: str = "proj") -> list[Piece]:
    return [Piece(f"{prefix}{fused}.weight", 0, outer, head_dim), Piece(f"{prefix}{fused}.bias", 0, outer, head_dim),
            Piece(f"{prefix}{out}.weight", 1, 1, head_dim)]  # fmt: skip


def _channels(prefix: str) -> list[Piece]:
    return [Piece(f"{prefix}fc1.weight", 0), Piece(f"{prefix}fc1.bias", 0), Piece(f"{prefix}fc2.weight", 1)]


def width_families(block: nn.Module, head_dim: int) -> list[Family]:
    """The head and channel families of a block (see the module docstring); refused in one line for other kinds.

    A head owns its q, k and v rows of the fused projections (weights and biases) and its columns of the output
    projections; a channel owns its ``fc1`` row and bias and its ``fc2`` column. Shared biases (output projections,
    ``fc2``) and the per-head-width q/k norms belong to no unit.
    """
    form = block_form(block)
    if form in ("dit", "flux-single", "pixart"):
        families = [Family("attention", "heads", tuple(_heads("attn.", head_dim)))]
        if form == "pixart":
            cross = [Piece("cross_attn.q_linear.weight", 0, 1, head_dim), Piece("cross_attn.q_linear.bias", 0, 1, head_dim),
                     *_heads("cross_attn.", head_dim, "kv_linear", 2)[:2], Piece("cross_attn.proj.weight", 1, 1, head_dim)]  # fmt: skip
            families.append(Family("cross_attention", "heads", tuple(cross)))
        return [*families, Family("mlp", "channels", tuple(_channels("mlp.")))]
    if form in ("mmdit", "mmdit-pre"):
        joint = _heads("attn.image.", head_dim) + _heads("attn.", head_dim, "context_qkv", 3, "context_proj")
        if form == "mmdit-pre":  # no text output projection
            joint = joint[:-1]
        families = [Family("joint_attention", "heads", tuple(joint)), Family("mlp", "channels", tuple(_channels("mlp.")))]
        if form == "mmdit":
            families.append(Family("text_mlp", "channels", tuple(_channels("context_mlp."))))
        return families
    raise ValueError(f"width pruning knows the dit, pixart, mmdit, flux and flux-single blocks; this network's "
                     f"blocks are {form} (prune its depth instead)")  # fmt: skip


def check_width_prunable(dit: DiT) -> None:
    """Width pruning slices heads of ``full`` attention and channels of the ``dense`` MLP of the block kinds
    :func:`width_families` knows, on the plain block loop; refuse anything else in one line."""
    config = dit.config
    if (config.attention, config.mlp) != ("full", "dense"):
        raise ValueError(f"width pruning handles full attention and the dense MLP; this DiT has {config.attention!r} "
                         f"attention and a {config.mlp!r} MLP (prune its depth instead)")  # fmt: skip
    for block in dit.blocks:
        width_families(block, config.attention_head_dim)


def family_scores(
    dit: DiT, score: str = "magnitude", grads: Mapping[str, torch.Tensor] | None = None, norm: int = 2
) -> list[dict[str, torch.Tensor]]:
    """Importance of every unit, per block: family name -> ``(units,)`` scores (:func:`width_families`).

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
    config = dit.config
    counts = {"heads": config.num_heads, "channels": config.mlp_width}
    result = []
    with torch.no_grad():
        for index, block in enumerate(dit.blocks):
            parameters = dict(block.named_parameters())
            scores = {}
            for family in width_families(block, config.attention_head_dim):
                units = counts[family.kind]
                total = 0
                for piece in family.pieces:
                    weight = parameters[piece.name]
                    if score == "magnitude":
                        values = weight.float().abs().pow(norm)
                    else:
                        key = f"blocks.{index}.{piece.name}"
                        if key not in grads:
                            raise ValueError(f"grads has no entry {key!r}; pass the dict taylor_scores() returns")
                        values = (weight.float() * grads[key].to(weight.device).float()).abs()
                    total = total + piece.sums(values, units)
                scores[family.name] = total.pow(1 / norm) if score == "magnitude" else total
            result.append(scores)
    return result


def unit_scores(
    dit: DiT, score: str = "magnitude", grads: Mapping[str, torch.Tensor] | None = None, norm: int = 2
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Importance of every head and MLP channel: per block, ``(H,)`` head and ``(M,)`` channel scores of the
    block's first head family (self- or joint attention) and its image MLP (:func:`family_scores` has them all).

    ``"magnitude"``: the L-``norm`` norm of the unit's own weights; ``"taylor"``: ``sum |w * g|`` over them,
    with ``g = grads["blocks.<i>.<param>"]`` (see :func:`taylor_scores`).
    """
    per_block = family_scores(dit, score, grads, norm)
    heads = [next(iter(scores.values())) for scores in per_block]
    return heads, [scores["mlp"] for scores in per_block]


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
    cross_heads: int | None = None,
    text_mlp_hidden: int | None = None,
) -> DiT:
    """A new DiT keeping the ``num_heads`` top-scoring heads of every head family of every block and the
    ``mlp_hidden`` top-scoring channels of every MLP (each family ranked on its own, :func:`family_scores`).

    ``None`` keeps all of that kind. Kept units stay in their original order and ``head_dim`` is unchanged
    (the attention scale too), so keeping everything reproduces ``dit`` exactly. ``cross_heads`` (PixArt's
    cross-attention) and ``text_mlp_hidden`` (the MM-DiT text stream's MLP) may only repeat ``num_heads`` /
    ``mlp_hidden`` (one config count per kind; refused in one line otherwise).
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
    for name, value, shared, field in (("cross_heads", cross_heads, num_heads, "num_heads"),
                                       ("text_mlp_hidden", text_mlp_hidden, mlp_hidden, "mlp_hidden")):  # fmt: skip
        if value is not None and value != shared:
            raise ValueError(f"{name}={value} differs from {field}={shared}, but a DiTConfig gives every block one "
                             f"{field} for all its head / MLP families; set {name} to {shared} or leave it unset")  # fmt: skip
    per_block = family_scores(dit, score, grads, norm)
    counts = {"heads": (heads_before, num_heads), "channels": (channels_before, mlp_hidden)}
    blocks = []
    for block, scores in zip(dit.blocks, per_block):
        state = dict(block.state_dict())
        for family in width_families(block, head_dim):
            units, kept_count = counts[family.kind]
            kept = scores[family.name].topk(kept_count).indices.sort().values
            for piece in family.pieces:
                state[piece.name] = piece.select(state[piece.name], units, kept)
        blocks.append(state)
    config = config.replace(num_heads=num_heads, head_dim=head_dim, mlp_hidden=mlp_hidden)
    return _rebuild(dit, config, _student_state(dit, blocks))
