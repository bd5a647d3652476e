"""Dynamic compute: a DiT that spends less where a step, a sample or a region needs less, with the savings real
in wall time.

Three trunk kinds (``DiTConfig.trunk``) run the plain blocks behind routers, through the core's branch hooks:

- ``dydit`` (:mod:`.dydit`): timestep-wise head and MLP channel-group masks and MLP token bypass (DyDiT);
- ``elastic`` (:mod:`.elastic`): a per-block router that skips the block or narrows its MLP per sample
  (Elastic-DiT);
- ``chunking`` (:mod:`.chunking`): the blocks run on the tokens a router keeps, the result written back to every
  position (DC-DiT's dynamic chunking).

Training masks (straight-through hard decisions), evaluation slices: the kept heads, channels, tokens and
samples only. :class:`~.module.DynamicModule` fine-tunes a teacher (or trains from scratch) with the FLOPs-target
loss measured from the network's own component FLOPs; :func:`~.export.export` writes the inference form, a
normal ditlab checkpoint. Importing this package registers the trunk kinds (``ditlab.methods`` imports it).
D2iT (a dynamic VAE and grain transformer) is not implemented.
"""

from ditlab.methods.dynamic.chunking import ChunkingTrunk
from ditlab.methods.dynamic.dydit import DyDiTTrunk
from ditlab.methods.dynamic.elastic import ElasticTrunk
from ditlab.methods.dynamic.export import dynamic_flops, export

__all__ = ["ChunkingTrunk", "DyDiTTrunk", "ElasticTrunk", "dynamic_flops", "export"]
