"""The DiT core: pure PyTorch, importable into any training loop."""

import ditlab.models.operators  # noqa: F401 - registers the efficient attention kinds (local, window, hyena, ...)
from ditlab.models.dit import DiT

__all__ = ["DiT"]
