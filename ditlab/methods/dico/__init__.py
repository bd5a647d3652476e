"""DiCo (Ai et al., "DiCo: Revitalizing ConvNets for Scalable and Efficient Diffusion Modeling", NeurIPS 2025): a
ConvNet diffusion backbone on the core's extension points. Importing this package registers the ``dico`` block kind
(the conv block with compact channel attention, :mod:`ditlab.methods.dico.block`) and the ``dico`` trunk (the
paper's U-shaped macro design, :mod:`ditlab.methods.dico.trunk`); a config or checkpoint naming them builds through
``ditlab.plugins`` without importing this package first. ``configs/dico.yaml`` trains it on digits."""

from ditlab.methods.dico.block import DiCoBlock, dico_levels
from ditlab.methods.dico.trunk import DiCoTrunk

__all__ = ["DiCoBlock", "DiCoTrunk", "dico_levels"]
