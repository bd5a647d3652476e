"""The caption grammar of the digit scenes: vocabulary, structured attributes, caption <-> attributes.

A caption is generated from the attributes and parsed back exactly (positions aside, which a caption names only
through its relation), so a metric can read what a prompt asks for from the prompt text alone::

    caption    := objects " on a " background " background"
    objects    := object                                  (one digit)
                | object " " relation " " object          (two digits; the first relative to the second)
                | object ", " object " and " object       (three digits; no relation)
    object     := "a " size " " colour " " digit
    size       := small | large
    colour     := red | green | blue | yellow | purple | cyan | white | orange
    digit      := 0 | 1 | ... | 9
    relation   := left of | right of | above | below
    background := black | grey | brown | navy | striped | checkered | speckled

Relations are read from centres, the dominant axis deciding (image y grows downwards): A is "left of" B when
``|dx| >= |dy|`` and ``x_A < x_B``, "above" B when ``|dy| > |dx|`` and ``y_A < y_B``. The generator only lays out
unambiguous pairs (see ``ditlab.data.scenes``); a recognizer checks generated images with the same rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

DIGIT_WORDS: tuple[str, ...] = tuple(str(digit) for digit in range(10))
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan", "white", "orange")
SIZES: tuple[str, ...] = ("small", "large")
SIZE_PIXELS: dict[str, int] = {"small": 10, "large": 14}  # a digit's box side on the 32x32 canvas
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
BACKGROUNDS: tuple[str, ...] = ("black", "grey", "brown", "navy", "striped", "checkered", "speckled")

_OBJECT = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ([0-9])"
_CAPTION = re.compile(
    rf"^{_OBJECT}(?: ({'|'.join(RELATIONS)}) {_OBJECT}|, {_OBJECT} and {_OBJECT})? "
    rf"on a ({'|'.join(BACKGROUNDS)}) background$"
)


@dataclass
class SceneAttributes:
    """What a scene holds, in caption order: one entry per digit in ``digits``/``colours``/``sizes``/``positions``
    (centre ``(x, y)`` in [0, 1], y downwards), the relation of digit 0 to digit 1 (two digits only) and the
    background. Parsed from a caption, ``positions`` is empty: the caption names only the relation."""

    digits: list[int]
    colours: list[str]
    sizes: list[str]
    positions: list[tuple[float, float]] = field(default_factory=list)
    relation: str | None = None
    background: str = "black"

    @property
    def count(self) -> int:
        return len(self.digits)

    def described(self) -> SceneAttributes:
        """The attributes a caption carries (everything but the positions)."""
        return replace(self, positions=[])

    def caption(self) -> str:
        """The caption of these attributes (the grammar above)."""
        objects = [f"a {size} {colour} {digit}" for digit, colour, size in zip(self.digits, self.colours, self.sizes)]
        if len(objects) == 1:
            text = objects[0]
        elif len(objects) == 2:
            if self.relation not in RELATIONS:
                raise ValueError(f"two digits need a relation from {RELATIONS}; got {self.relation!r}")
            text = f"{objects[0]} {self.relation} {objects[1]}"
        elif len(objects) == 3:
            text = f"{objects[0]}, {objects[1]} and {objects[2]}"
        else:
            raise ValueError(f"a scene holds 1 to 3 digits; got {len(objects)}")
        return f"{text} on a {self.background} background"


def parse_caption(caption: str) -> SceneAttributes:
    """The attributes a caption asks for (``positions`` empty); a one-line ValueError off the grammar."""
    match = _CAPTION.match(caption.strip())
    if match is None:
        raise ValueError(f"caption {caption!r} is not in the digit-scenes grammar (e.g. 'a small red 3 left of a "
                         "large blue 7 on a grey background')")  # fmt: skip
    groups = match.groups()
    first, relation, second, listed, background = groups[0:3], groups[3], groups[4:7], groups[7:13], groups[13]
    objects = [first]
    if relation is not None:
        objects.append(second)
    elif listed[0] is not None:
        objects += [listed[0:3], listed[3:6]]
    return SceneAttributes(digits=[int(obj[2]) for obj in objects], colours=[obj[1] for obj in objects],
                           sizes=[obj[0] for obj in objects], relation=relation, background=background)  # fmt: skip


def relation_of(first: tuple[float, float], second: tuple[float, float]) -> str:
    """Where centre ``first`` lies relative to ``second``: the dominant axis of their offset decides."""
    dx, dy = first[0] - second[0], first[1] - second[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"
