"""Method families over the DiT core. Importing this package registers the component kinds the methods bring
(the ``moe`` MLP, the ``parallel-pair`` block, the dynamic-compute trunks) and the feature-cache policies, so a
checkpoint or config that names one builds wherever a method is importable."""

import ditlab.methods.sampling.caches  # noqa: F401 - registers the feature-cache policies (sampling.cache)
import ditlab.methods.dynamic  # noqa: F401 - registers the dynamic-compute trunks (dydit, elastic, chunking)
import ditlab.methods.graft  # noqa: F401 - registers the "parallel-pair" block kind
import ditlab.methods.moe  # noqa: F401 - registers the "moe" MLP kind
