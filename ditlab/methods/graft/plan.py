"""Which blocks a graft converts: ``all``, ``odd`` / ``even`` (1-based, as the papers count), a list of 0-based
indices, or a fraction of the depth spread evenly (Grafting's "50%" of DiT-XL/2 is its odd blocks 1, 3, ..., 27,
i.e. 0-based 0, 2, ..., 26, which is also what ``0.5`` picks)."""

from __future__ import annotations

from typing import Any


def select_blocks(spec: Any, depth: int) -> list[int]:
    """The 0-based block indices ``spec`` names in a ``depth``-block DiT."""
    if spec == "all":
        return list(range(depth))
    if spec in ("odd", "even"):
        return list(range(0 if spec == "odd" else 1, depth, 2))
    if isinstance(spec, (list, tuple)):
        if not all(isinstance(b, int) for b in spec):
            raise ValueError(f"model.graft.blocks={spec!r} must be a list of 0-based block indices")
        outside = sorted(b for b in spec if not 0 <= b < depth)
        if outside:
            raise ValueError(f"model.graft.blocks has {outside} outside 0..{depth - 1} for a {depth}-block teacher")
        return sorted(set(spec))
    if isinstance(spec, (int, float)) and not isinstance(spec, bool) and 0.0 < spec <= 1.0:
        count = max(1, round(spec * depth))
        return sorted({int(i * depth / count) for i in range(count)})
    raise ValueError(f"model.graft.blocks={spec!r}; use all, odd, even, a fraction in (0, 1] or a list of indices")
