"""Method families over the DiT core. Importing this package registers the component kinds the methods bring
(``moe``) and the feature-cache policies, so a checkpoint or config that names one builds wherever a method is
importable."""

import ditlab.methods.accel  # noqa: F401 - registers the feature-cache policies (sampling.cache)
import ditlab.methods.moe  # noqa: F401 - registers the "moe" MLP kind
