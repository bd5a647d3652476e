"""The DiT core: pure PyTorch, importable into any training loop."""

from ditlab.models.dit import DiT

__all__ = ["DiT"]
