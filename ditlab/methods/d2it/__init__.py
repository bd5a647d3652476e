"""D2iT: Dynamic Diffusion Transformer for Accurate Image Generation (Jia et al., CVPR 2025, arXiv 2504.09454).

Multi-grained noise prediction at ditlab's scale: the trunk kind ``d2it`` (:mod:`.trunk`) runs the DiT's blocks on
coarse tokens in smooth regions and fine tokens in detailed ones and restores the fine grid before the head; the grain
map comes from an entropy measure of the clean input in training (:mod:`.grain`) and from a learned grain router at
sampling. :class:`D2iTModule` (``configs/d2it.yaml``) trains it; :func:`~ditlab.models.budget.flops_per_image`
counts its FLOPs (the blocks at the mixed-grain length). What stands in for the paper's dynamic VAE and grain
transformer is listed, marked [interp], in :mod:`.trunk`. Importing this package registers the trunk kind.
"""

from ditlab.methods.d2it.grain import grain_map, region_entropy, region_variance
from ditlab.methods.d2it.module import D2iTModule
from ditlab.methods.d2it.trunk import D2iTTrunk, plain_flops

__all__ = ["D2iTModule", "D2iTTrunk", "grain_map", "plain_flops", "region_entropy", "region_variance"]
