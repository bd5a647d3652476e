"""Efficient attention operators for the ``attention`` slot of a DiT block.

Each module registers one attention kind built as ``Attention.from_config(config, operator)``, so a
checkpoint that names one (``attention: local``) loads wherever :mod:`ditlab.models` is imported:

- ``local``: CLEAR's circular neighbourhood on the token grid, optional learnable pooled keys/values;
- ``window``: a square (2-D) or raster (1-D, as Grafting's SWA) sliding window;
- ``hyena``: Grafting's Hyena-X / Y / SE short-convolution mixers (pure PyTorch, causal raster or 2-D);
- ``block-sparse``: AdaSpa's coverage-searched key blocks, searched at some calls and reused at others;
- ``hierarchical``: Scale-DiT's windows along a Hilbert curve plus a low-resolution global pathway.

Every kind takes ``attention_options.blocks`` (block indices; default all): the other blocks keep full
attention, which is how a partly grafted network (Grafting's "50%") is one config.
"""

import ditlab.models.operators.block_sparse  # noqa: F401
import ditlab.models.operators.hierarchical  # noqa: F401
import ditlab.models.operators.hyena  # noqa: F401
import ditlab.models.operators.kv_compress  # noqa: F401
import ditlab.models.operators.local  # noqa: F401
import ditlab.models.operators.window  # noqa: F401
