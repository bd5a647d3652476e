"""Grafting: new attention operators or parallel block pairs put into a trained DiT, then fine-tuned.

Chandrasegaran et al., "Exploring Diffusion Transformer Designs via Grafting" (NeurIPS 2025,
https://github.com/keshik6/grafting) and CLEAR (Liu et al., NeurIPS 2025, https://github.com/Huage001/CLEAR).
Importing this package registers the ``parallel-pair`` block kind and the ``clear`` attention kind (CLEAR's local
attention with an MM-DiT's text tokens attended globally, :mod:`ditlab.methods.graft.clear`).
"""

from ditlab.methods.graft.build import graft_operator, parallel_pairs
from ditlab.methods.graft.clear import JointLocalAttention
from ditlab.methods.graft.parallel import ParallelPair
from ditlab.methods.graft.plan import select_blocks

__all__ = ["JointLocalAttention", "ParallelPair", "graft_operator", "parallel_pairs", "select_blocks"]
