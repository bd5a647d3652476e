"""Mixture of experts for DiT: the ``moe`` feed-forward kind (DiT-MoE) and Mixture of Blocks (Dense2MoE).

Importing this package registers the ``moe`` MLP kind and the ``mixture-of-blocks`` trunk, so any ``DiTConfig(mlp="moe", ...)`` builds and any
checkpoint that names it loads (``ditlab.methods`` imports it). Converting a trained dense DiT into experts
is a dicomp path: ``ditlab.methods.compress.dense2moe``.
"""

from ditlab.methods.moe import blocks  # noqa: F401 - registers the "mixture-of-blocks" trunk kind
from ditlab.methods.moe.layer import MoEFeedForward, MoEOptions

__all__ = ["MoEFeedForward", "MoEOptions"]
