"""``D2iTModule``: trains a DiT with the ``d2it`` trunk (multi-grained noise prediction, :mod:`.trunk`).

Each step, the clean batch's grain map (:func:`~ditlab.methods.d2it.grain.grain_map`: the entropy of each ``2 x 2``
token region's pixels, its ``fine_ratio`` highest regions fine) is handed to the trunk for the forward (the paper's
content transformer trains on its DVAE's maps; ``teacher_forcing: false`` lets the router choose instead), and the
grain router learns to predict that map from the noisy tokens (``loss_grain``, binary cross-entropy, weighted by
``router_weight``). Sampling, validation and evaluation run the router's maps.

``summary.json`` gets ``d2it``: the fine share, the token counts and the FLOPs per image of the network and of its
all-fine (fixed-granularity) form, from the components' own counts (:func:`~ditlab.models.budget.flops_per_image`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jsonargparse import lazy_instance

from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.base import DiffusionModule
from ditlab.methods.d2it.grain import MEASURES, grain_map, top_regions
from ditlab.methods.d2it.trunk import d2it_trunk_of, plain_flops
from ditlab.models.budget import flops_per_image
from ditlab.models.config import DiTConfig


class D2iTModule(DiffusionModule):
    """A ``DiffusionModule`` for the ``d2it`` trunk (``network.trunk: d2it``).

    Args:
        network: the DiT, with ``trunk: d2it`` and ``trunk_options.fine_ratio``.
        objective: the training objective.
        sampling: how samples are drawn (the grain router picks each step's map).
        measure: the grain map's detail measure: ``entropy`` (the paper's, on pixel intensities) or ``variance``
            (latent inputs).
        bins: points of the entropy's kernel density estimate on [-1, 1].
        bandwidth: its Gaussian kernel's width.
        router_weight: weight of the grain router's loss (``loss_grain``).
        teacher_forcing: train the blocks on the clean input's grain map (else on the router's).
        **kwargs: ``DiffusionModule``'s arguments.
    """

    def __init__(self, network: DiTConfig = lazy_instance(DiTConfig), objective: ObjectiveConfig = ObjectiveConfig(),
                 sampling: SamplingConfig = SamplingConfig(), measure: str = "entropy", bins: int = 32,
                 bandwidth: float = 0.1, router_weight: float = 0.1, teacher_forcing: bool = True,
                 **kwargs) -> None:  # fmt: skip
        if measure not in MEASURES:
            raise ValueError(f"model.init_args.measure={measure!r}; choices: {list(MEASURES)}")
        super().__init__(network=network, objective=objective, sampling=sampling, **kwargs)
        self.measure, self.bins, self.bandwidth = measure, bins, bandwidth
        self.router_weight, self.teacher_forcing = router_weight, teacher_forcing
        trunk = d2it_trunk_of(self.network)
        self.summary["d2it"] = {"fine_ratio": trunk.fine_ratio, "fine_regions": trunk.fine,
                                "regions": trunk.num_regions, "tokens": trunk.sequence_length,
                                "dense_tokens": self.network.x_embedder.num_patches,
                                "flops_per_image": flops_per_image(self.network),
                                "dense_flops_per_image": plain_flops(self.network), "measure": measure}  # fmt: skip

    def target_map(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, R)`` the clean batch's fine-grain map (regions of ``2 x 2`` patches)."""
        trunk = d2it_trunk_of(self.network)
        side = 2 * self.network.patch_size
        return grain_map(images, side, trunk.fine_ratio, self.measure, self.bins, self.bandwidth)

    def training_losses(self, images: torch.Tensor, labels) -> dict[str, torch.Tensor]:
        trunk = d2it_trunk_of(self.network)
        noised, drop = self.training_draws(images, labels)
        target = self.target_map(images) if trunk.coarse else None
        if target is not None and self.teacher_forcing:
            trunk.given = target
        output = self.network(noised.xt, noised.model_t, labels, force_drop_ids=drop)
        terms = self.objective.losses(output, images, noised)
        if target is None:
            return terms
        logits = trunk.last["logits"]
        grain = F.binary_cross_entropy_with_logits(logits, target.float())
        chosen = top_regions(logits.detach(), trunk.fine)
        terms = {**terms, "loss_grain": grain, "grain_agreement": (chosen == target).float().mean()}
        terms["loss"] = terms["loss"] + self.router_weight * grain
        return terms
