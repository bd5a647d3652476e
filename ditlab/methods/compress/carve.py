"""Carve a trained dense DiT's FFNs into shared and routed experts (Dense2MoE), or upcycle them.

Dense2MoE (Zheng et al., "Dense2MoE: Restructuring Diffusion Transformer to MoE for Efficient Text-to-Image
Generation", arXiv 2510.09094; no public code, so the details here are [interp]):

1. *Neuron importance* (Taylor): for hidden unit j of a block's FFN with post-activation ``a_j`` (the input of
   ``fc2``), ``I_j = E_images |sum_tokens a_j dL/da_j|`` with L the teacher's own diffusion loss on calibration
   images (:func:`calibrate_ffns`).
2. *Carving*: the ``shared_width`` most important units form the always-on shared expert; the rest are split
   into E routed experts of equal width, either contiguous in importance rank (the paper's default), strided
   (each expert gets every E-th rank, so experts are alike in importance) or by balanced k-means on the units'
   co-activation over calibration tokens (MoEfication-style: units that fire together share an expert).
   Each expert keeps its units' ``fc1`` rows and biases and ``fc2`` columns; ``fc2``'s bias is added once, so
   with every expert on and unit gates the layer *is* the dense FFN (the partition of a sum).
3. *Router initialisation*: ``fit`` regresses the router logits on each expert's output norm per calibration
   token (ridge least squares, standardised per token), so the router starts by picking the experts that
   contribute most; ``centroid`` uses the mean ``fc1`` row of each expert's units; ``random`` DiT-MoE's init.

*Upcycling* (Komatsuzaki et al., "Sparse Upcycling", 2023; DiT-MoE's upcycle script) copies the whole FFN
into every expert; with renormalised top-K gates the upcycled layer equals the dense one at the start.

*Text-to-image networks.* Dense2MoE restructures FLUX.1, whose double-stream (MM-DiT) blocks hold an FFN per
stream. Every FFN of a block is carved (:func:`block_ffns`): ``mlp`` (the image stream; PixArt's and FLUX
single-stream blocks have only this one) and, in ``mmdit`` / ``flux`` double blocks, ``context_mlp`` (the text
stream), each from its own calibration (importance on the text stream's tokens for ``context_mlp``; the
calibration of :func:`calibrate_ffns` keeps it in ``FFNCalibration.context``). [interp] Both streams get the
same expert layout (the network's one ``mlp_options``); the paper does not say how it treats FLUX's text FFNs.
A context-pre-only last block (SD3) has no text FFN, so only its image FFN is carved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ditlab.diffusion import FlowMatching, GaussianDiffusion
from ditlab.methods.compress.prune import _rebuild
from ditlab.methods.moe.layer import MoEFeedForward, MoEOptions
from ditlab.models.dit import DiT
from ditlab.models.mlp import DenseMLP

ASSIGNMENTS = ("contiguous", "strided", "cluster")
ROUTER_INITS = ("fit", "centroid", "random")


@dataclass
class CarveConfig:
    """How each dense FFN of the teacher becomes a mixture of experts.

    Args:
        mode: ``split`` (Dense2MoE: partition the FFN's units) or ``upcycle`` (every expert a copy of the FFN).
        num_experts: routed experts E per block.
        top_k: routed experts per token K.
        shared_width: units of the always-on shared expert (``split``; 0 for none).
        assignment: how the routed units are split: contiguous | strided (in importance rank) | cluster.
        importance: unit ranking: ``taylor`` (``|sum a dL/da|``) or ``magnitude`` (norm of the unit's weights).
        router_init: fit | centroid | random (see the module docstring).
        gate: gate of a routed expert: straight_through (value 1: the carved layer starts as the sum of its
            chosen experts), softmax (DiT-MoE) or normalized (default for ``upcycle``: experts sum to the FFN).
        routing: token_choice or expert_choice.
        balance_weight: alpha of the expert balance loss (token choice).
        z_loss_weight: router z-loss weight.
        blocks: blocks whose FFN is carved; None is every block.
        calibration_images: training images for importance, clustering and the router fit.
        max_tokens: calibration tokens kept per block for clustering and the router fit.
        seed: calibration noise, timesteps and clustering.
    """

    mode: Literal["split", "upcycle"] = "split"
    num_experts: int = 7
    top_k: int = 2
    shared_width: int = 64
    assignment: Literal["contiguous", "strided", "cluster"] = "cluster"
    importance: Literal["taylor", "magnitude"] = "taylor"
    router_init: Literal["fit", "centroid", "random"] = "fit"
    gate: Literal["straight_through", "softmax", "normalized"] | None = None
    routing: Literal["token_choice", "expert_choice"] = "token_choice"
    balance_weight: float = 0.01
    z_loss_weight: float = 0.0
    blocks: list[int] | None = None
    calibration_images: int = 256
    max_tokens: int = 4096
    seed: int = 0

    def moe_options(self, mlp_width: int) -> dict:
        """The ``mlp_options`` of the carved network (one line per mistake, naming ``carve.<key>``)."""
        if self.mode not in ("split", "upcycle"):
            raise ValueError(f"carve.mode={self.mode!r}; choices: ['split', 'upcycle']")
        if self.assignment not in ASSIGNMENTS or self.router_init not in ROUTER_INITS:
            raise ValueError(f"carve.assignment={self.assignment!r} / carve.router_init={self.router_init!r}; choices: "
                             f"{list(ASSIGNMENTS)} / {list(ROUTER_INITS)}")  # fmt: skip
        if self.top_k > self.num_experts:
            raise ValueError(f"carve.top_k={self.top_k} exceeds carve.num_experts={self.num_experts}; "
                             "choose top_k <= num_experts")  # fmt: skip
        if self.mode == "upcycle":
            hidden, shared = mlp_width, 0
        else:
            routed = mlp_width - self.shared_width
            if not 0 <= self.shared_width < mlp_width:
                raise ValueError(f"carve.shared_width={self.shared_width} must be in 0..{mlp_width - 1} "
                                 f"(the teacher's MLP width is {mlp_width})")  # fmt: skip
            if self.num_experts < 1 or routed % self.num_experts:
                divisors = [e for e in range(2, min(routed, 64) + 1) if routed % e == 0][:6]
                raise ValueError(f"carve.num_experts={self.num_experts} does not divide the {routed} routed units "
                                 f"(MLP width {mlp_width} - shared_width {self.shared_width}); pick one of "
                                 f"{divisors} or change shared_width")  # fmt: skip
            hidden, shared = routed // self.num_experts, self.shared_width
        gate = self.gate or ("normalized" if self.mode == "upcycle" else "straight_through")
        return {"num_experts": self.num_experts, "top_k": self.top_k, "expert_hidden": hidden, "shared_hidden": shared,
                "expert": "gelu", "routing": self.routing, "gate": gate, "balance_weight": self.balance_weight,
                "z_loss_weight": self.z_loss_weight, "blocks": self.blocks}  # fmt: skip


FFN_NAMES = ("mlp", "context_mlp")
"""The feed-forward networks a block may hold: its (image-stream) MLP and an MM-DiT block's text-stream MLP."""


def block_ffns(block: nn.Module) -> list[str]:
    """Names of the FFNs ``block`` holds (``mlp``, then ``context_mlp`` where an MM-DiT block has one)."""
    return [name for name in FFN_NAMES if getattr(block, name, None) is not None]


def check_dense(dit: DiT, source: str = "the teacher") -> None:
    """Carving needs DiT's dense MLP in every block to carve."""
    if dit.config.mlp != "dense":
        raise ValueError(f"Dense2MoE carves a dense MLP, but {source} has a {dit.config.mlp!r} MLP (an MoE checkpoint "
                         "given as the dense teacher?); pass a dense DiT as model.teacher.checkpoint")  # fmt: skip


# --- calibration --------------------------------------------------------------------------------------------


@dataclass
class FFNCalibration:
    """What carving learns from calibration images, one entry per block."""

    importance: list[torch.Tensor]
    """``(H,)`` Taylor importance of each FFN unit."""
    inputs: list[torch.Tensor]
    """``(T, D)`` FFN inputs (normalised, modulated tokens), at most ``max_tokens`` rows."""
    hidden: list[torch.Tensor]
    """``(T, H)`` FFN post-activation units on the same tokens."""
    context: FFNCalibration | None = None
    """The same for the text-stream FFNs (``context_mlp``) of an MM-DiT, None entries for blocks without one; None
    for a network without a text stream."""

    def stream(self, name: str) -> FFNCalibration:
        """The calibration of the FFNs called ``name`` (``mlp`` or ``context_mlp``)."""
        if name == "mlp":
            return self
        if self.context is None:
            raise ValueError("this calibration has no text-stream FFNs (calibrate_ffns on an MM-DiT records them)")
        return self.context


def calibrate_ffns(dit: DiT, objective: GaussianDiffusion | FlowMatching, images: torch.Tensor, labels,
                   batch_size: int = 64, max_tokens: int = 4096, seed: int = 0) -> FFNCalibration:  # fmt: skip
    """Taylor importance of every FFN unit, and sampled FFN inputs and activations, on ``images (M, C, H, W)``.

    ``labels`` is the network's condition input (class labels, or a text-conditioned network's ``TextFeatures``).
    Noise and timesteps come from ``objective.prepare`` with a ``seed``-ed generator; the network runs in eval
    mode (no label or caption drop-out); only activations get gradients (the weights' ``requires_grad`` are
    untouched). Every FFN of every block is calibrated (:func:`block_ffns`: an MM-DiT's text-stream FFNs on the
    text tokens, in ``FFNCalibration.context``).
    """
    check_dense(dit, "this network")
    generator = torch.Generator(device=images.device).manual_seed(seed)
    layers = [(i, name, getattr(block, name)) for i, block in enumerate(dit.blocks) for name in block_ffns(block)]
    scores = {(i, name): torch.zeros(mlp.fc1.out_features, device=images.device) for i, name, mlp in layers}
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {(i, name): [] for i, name, _ in layers}
    hidden: dict[tuple[int, str], list[torch.Tensor]] = {(i, name): [] for i, name, _ in layers}
    mlp_inputs: dict[tuple[int, str], torch.Tensor] = {}
    activations: dict[tuple[int, str], torch.Tensor] = {}

    def keep_input(store: dict, key: tuple[int, str]) -> Callable:
        def hook(module: nn.Module, args: tuple[torch.Tensor]) -> None:
            store[key] = args[0]

        return hook

    handles = [h for i, name, mlp in layers
               for h in (mlp.register_forward_pre_hook(keep_input(mlp_inputs, (i, name))),
                         mlp.fc2.register_forward_pre_hook(keep_input(activations, (i, name))))]  # fmt: skip
    was_training = dit.training
    dit.eval()
    kept_per_batch = max(1, max_tokens // max(1, -(-len(images) // batch_size)))
    try:
        for start in range(0, len(images), batch_size):
            x0, y = images[start : start + batch_size], labels[start : start + batch_size]
            noised = objective.prepare(x0, generator=generator)
            xt = noised.xt.detach().requires_grad_(True)  # gradients reach the activations, not the weights
            output = dit(xt, noised.model_t, y)
            loss = objective.losses(output, x0, noised)["loss"] * len(x0)  # per-image loss sums: dl_b / da_b
            keys = [(i, name) for i, name, _ in layers]
            grads = torch.autograd.grad(loss, [activations[key] for key in keys])
            for key, g in zip(keys, grads):
                a = activations[key]
                scores[key] += (a * g).sum(1).abs().sum(0).detach()
                rows = torch.randperm(a.shape[0] * a.shape[1], generator=generator, device=a.device)[:kept_per_batch]
                inputs[key].append(mlp_inputs[key].detach().flatten(0, 1)[rows])
                hidden[key].append(a.detach().flatten(0, 1)[rows])
    finally:
        for handle in handles:
            handle.remove()
        dit.train(was_training)

    def stream(name: str) -> FFNCalibration:
        keys = [(i, name) for i in range(dit.depth)]
        return FFNCalibration([scores[k] / len(images) if k in scores else None for k in keys],
                              [torch.cat(inputs[k])[:max_tokens] if k in inputs else None for k in keys],
                              [torch.cat(hidden[k])[:max_tokens] if k in hidden else None for k in keys])  # fmt: skip

    calibration = stream("mlp")
    if any(name == "context_mlp" for _, name, _ in layers):
        calibration.context = stream("context_mlp")
    return calibration


def magnitude_importance(mlp: DenseMLP) -> torch.Tensor:
    """``(H,)`` L2 norm of each unit's own weights (its ``fc1`` row and bias, its ``fc2`` column)."""
    return (mlp.fc1.weight.square().sum(1) + mlp.fc1.bias.square() + mlp.fc2.weight.square().sum(0)).sqrt().detach()


# --- partition --------------------------------------------------------------------------------------------


def balanced_kmeans(features: torch.Tensor, num_clusters: int, iterations: int = 10, seed: int = 0) -> torch.Tensor:
    """``features (U, F)`` -> a cluster per row, every cluster exactly ``U / num_clusters`` rows (cosine k-means
    with a greedy capacity-limited assignment)."""
    count = features.shape[0]
    size = count // num_clusters
    unit = features / features.norm(dim=1, keepdim=True).clamp_min(1e-8)
    generator = torch.Generator().manual_seed(seed)
    centres = unit[torch.randperm(count, generator=generator)[:num_clusters].to(unit.device)]
    assignment = torch.zeros(count, dtype=torch.long, device=unit.device)
    for _ in range(iterations):
        similarity = unit @ centres.t()  # (U, K)
        order = similarity.flatten().argsort(descending=True)
        assignment.fill_(-1)
        room = [size] * num_clusters
        for flat in order.tolist():
            row, cluster = divmod(flat, num_clusters)
            if assignment[row] < 0 and room[cluster] > 0:
                assignment[row] = cluster
                room[cluster] -= 1
        centres = torch.stack([unit[assignment == k].mean(0) for k in range(num_clusters)])
        centres = centres / centres.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return assignment


def partition_units(importance: torch.Tensor, num_experts: int, shared_width: int, assignment: str = "contiguous",
                    activations: torch.Tensor | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Units of one FFN -> ``(shared (S,), experts (E, m))`` index tensors (together a partition of ``0..H-1``).

    ``shared`` holds the ``shared_width`` most important units; the rest go to experts as ``assignment`` says
    (``cluster`` needs ``activations (T, H)``); each expert's units are in ascending index order.
    """
    ranked = importance.argsort(descending=True, stable=True)
    shared, routed = ranked[:shared_width], ranked[shared_width:]
    width = len(routed) // num_experts
    if assignment == "contiguous":
        experts = routed.reshape(num_experts, width)
    elif assignment == "strided":
        experts = routed.reshape(width, num_experts).t()
    elif assignment == "cluster":
        if activations is None:
            raise ValueError("assignment='cluster' needs the units' calibration activations")
        clusters = balanced_kmeans(activations[:, routed].t().float(), num_experts, seed=seed)
        experts = torch.stack([routed[clusters == e] for e in range(num_experts)])
    else:
        raise ValueError(f"unknown assignment {assignment!r}; choices: {list(ASSIGNMENTS)}")
    return shared.sort().values, experts.sort(dim=1).values


# --- carving --------------------------------------------------------------------------------------------------


def carved_state(mlp: DenseMLP, shared: torch.Tensor, experts: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``moe`` layer's weights (gelu experts) holding ``mlp``'s units ``shared`` and ``experts`` (router zero)."""
    up, bias, down = mlp.fc1.weight.detach(), mlp.fc1.bias.detach(), mlp.fc2.weight.detach()
    state = {"router": up.new_zeros(experts.shape[0], up.shape[1]), "bias": mlp.fc2.bias.detach().clone(),
             "experts.up": up[experts].clone(), "experts.up_bias": bias[experts].clone(),
             "experts.down": down[:, experts].permute(1, 0, 2).clone()}  # fmt: skip
    if len(shared):
        state.update({"shared.up": up[shared][None].clone(), "shared.up_bias": bias[shared][None].clone(),
                      "shared.down": down[:, shared][None].clone()})  # fmt: skip
    return state


def upcycled_state(mlp: DenseMLP, num_experts: int) -> dict[str, torch.Tensor]:
    """Every expert a copy of ``mlp`` (router zero)."""
    up, bias, down = mlp.fc1.weight.detach(), mlp.fc1.bias.detach(), mlp.fc2.weight.detach()
    return {"router": up.new_zeros(num_experts, up.shape[1]), "bias": mlp.fc2.bias.detach().clone(),
            "experts.up": up.expand(num_experts, -1, -1).clone(),
            "experts.up_bias": bias.expand(num_experts, -1).clone(),
            "experts.down": down.expand(num_experts, -1, -1).clone()}  # fmt: skip


@torch.no_grad()
def fit_router(moe: MoEFeedForward, inputs: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Router ``(E, D)`` whose logits on ``inputs (T, D)`` best match each expert's standardised output norm."""
    flat = inputs.float()
    norms = torch.stack([moe.experts(e, inputs).float().norm(dim=-1) for e in range(moe.num_experts)], dim=1)
    target = (norms - norms.mean(1, keepdim=True)) / norms.std(1, keepdim=True).clamp_min(1e-6)
    gram = flat.t() @ flat
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], device=gram.device)
    return torch.linalg.solve(gram, flat.t() @ target).t().to(moe.router)


def centroid_router(moe: MoEFeedForward) -> torch.Tensor:
    """Router ``(E, D)``: the mean ``up`` row of each expert's units."""
    return moe.experts.up.detach().mean(1)


def carve_network(teacher: DiT, config: CarveConfig, calibration: FFNCalibration | None = None,
                  generator: torch.Generator | None = None) -> DiT:  # fmt: skip
    """A new DiT whose carved blocks hold ``moe`` layers made of ``teacher``'s FFN units; ``teacher`` is untouched.

    ``calibration`` (from :func:`calibrate_ffns`) is needed for ``taylor`` importance, ``cluster`` assignment and
    the ``fit`` router init. Every FFN of a carved block is carved (an MM-DiT's image and text streams); everything
    outside the carved FFNs is copied.
    """
    check_dense(teacher)
    options = config.moe_options(teacher.config.mlp_width)
    needs = config.mode == "split" and (config.importance == "taylor" or config.assignment == "cluster")
    if calibration is None and (needs or config.router_init == "fit"):
        raise ValueError("carving with taylor importance, cluster assignment or a fitted router needs calibration "
                         "(calibrate_ffns); or use importance='magnitude', assignment='contiguous', router_init='centroid'")  # fmt: skip
    student_config = teacher.config.replace(mlp="moe", mlp_options=options)
    carved = MoEOptions.from_config(student_config).blocks
    carved = range(teacher.depth) if carved is None else carved
    layers = [(index, name) for index in carved for name in block_ffns(teacher.blocks[index])]
    prefixes = tuple(f"blocks.{index}.{name}." for index, name in layers)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith(prefixes)}
    for index, name in layers:
        mlp: DenseMLP = getattr(teacher.blocks[index], name)
        if config.mode == "upcycle":
            layer = upcycled_state(mlp, config.num_experts)
        else:
            own = calibration.stream(name) if calibration is not None else None
            importance = own.importance[index] if config.importance == "taylor" else magnitude_importance(mlp)
            activations = own.hidden[index] if own is not None else None
            shared, experts = partition_units(importance, config.num_experts, config.shared_width, config.assignment,
                                              activations, seed=config.seed)  # fmt: skip
            layer = carved_state(mlp, shared, experts)
        state.update({f"blocks.{index}.{name}.{key}": value for key, value in layer.items()})
    student = _rebuild(teacher, student_config, state)
    for index, name in layers:
        moe: MoEFeedForward = getattr(student.blocks[index], name)
        with torch.no_grad():
            if config.mode == "upcycle" or config.router_init == "random":  # upcycled experts are alike: random
                nn.init.kaiming_uniform_(moe.router, a=5**0.5, generator=generator)
            elif config.router_init == "fit":
                inputs = calibration.stream(name).inputs[index]
                moe.router.copy_(fit_router(moe, inputs.to(moe.router.device)))
            else:
                moe.router.copy_(centroid_router(moe))
    return student
