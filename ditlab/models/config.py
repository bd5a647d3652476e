"""``DiTConfig``: the one description of a DiT/SiT architecture.

Every path that builds a network (a config file, a checkpoint, a safetensors export, a pruned student, a
public DiT file) goes through this dataclass, so whatever it can describe can be saved and rebuilt. Sizes
come from a *preset* (the paper sizes ``S/B/L/XL`` with patch ``2/4/8``, or ``digits``, ditlab's toy
network) and explicit fields win over it. The ``attention`` and ``mlp`` slots name a component in the
registries of :mod:`ditlab.models.components`; their ``*_options`` are passed to that component.

Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023), Table 1 for the sizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

SIZES: dict[str, dict[str, int]] = {
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "L": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
}
NAMED_PRESETS: dict[str, dict[str, int]] = {
    # the embedded digits (16x16, one channel, 10 classes): 12 blocks of width 128, patch 4 (configs/dit.yaml)
    "digits": {"input_size": 16, "patch_size": 4, "in_channels": 1, "hidden_size": 128, "depth": 12,
               "num_heads": 4, "num_classes": 10},
}  # fmt: skip
DEFAULTS = {"input_size": 32, "patch_size": 2, "in_channels": 4, **SIZES["XL"], "num_classes": 1000}
"""Without a preset: DiT-XL/2 on 32x32x4 SD-VAE latents of ImageNet (1000 classes)."""


def preset_names() -> list[str]:
    return [*NAMED_PRESETS, *(f"{size}/{patch}" for size in SIZES for patch in (2, 4, 8))]


def preset_values(name: str) -> dict[str, int]:
    """The fields a preset sets: ``"digits"``, ``"S/2"``, ``"DiT-XL/2"``, ``"SiT-B/4"`` ..."""
    if name in NAMED_PRESETS:
        return dict(NAMED_PRESETS[name])
    size, _, patch = name.removeprefix("DiT-").removeprefix("SiT-").partition("/")
    if size not in SIZES or patch not in ("", "2", "4", "8"):
        raise ValueError(f"unknown DiT preset {name!r}; choices: {preset_names()}")
    return {**SIZES[size], "patch_size": int(patch or 2)}


@dataclass
class DiTConfig:
    """A DiT/SiT backbone. Sizes left ``None`` come from ``preset`` (else DiT-XL/2 on 32x32x4 latents).

    Args:
        preset: ``digits`` or a paper size ``S/2`` .. ``XL/8``; explicit fields override it.
        input_size: image (or latent) side.
        patch_size: patch side.
        in_channels: image (or latent) channels.
        hidden_size: token width.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width over hidden size.
        class_dropout_prob: label drop-out for classifier-free guidance (0: no null class).
        num_classes: class labels (the null class is one more).
        learn_sigma: output the variance too (2 x in_channels outputs).
        freq_shift: timestep frequency shift (1 reproduces diffusers' port of DiT).
        mlp_norm_eps: eps of the LayerNorm before the MLP (1e-5 reproduces diffusers' port).
        qk_norm: normalise each head's queries and keys before attention: ``True``/``"layer"`` a LayerNorm (SiT/REPA
            option, on in Self-Transcendence), ``"rms"`` an RMSNorm with a learned scale (SD3.5, FLUX); off
            reproduces DiT and every public class-conditional checkpoint exactly.
        attention: the attention component, by registry name (``full``: softmax attention over all tokens).
        attention_options: keyword options of the attention component.
        mlp: the feed-forward component, by registry name (``dense``: DiT's GELU MLP).
        mlp_options: keyword options of the feed-forward component.
        block: the block kind, by registry name (``dit``: attention then MLP, each behind adaLN-Zero).
        block_options: keyword options of the block kind.
        head_dim: per-head width; None means hidden_size // num_heads (set by width pruning).
        mlp_hidden: MLP inner width; None means int(hidden_size * mlp_ratio) (set by width pruning).
        trunk: how the blocks run between ``embed`` and ``head``, by registry name (``blocks``: every block on
            every token; a dynamic-compute kind routes tokens, samples or widths around them).
        trunk_options: keyword options of the trunk.
        condition: what the network is conditioned on, by registry name: ``class`` (labels with a null class, DiT)
            or ``text`` (a text encoder's token embeddings, pooled vector and mask: ``ditlab.models.condition``).
        condition_options: keyword options of the condition (for ``text``: the encoder and its widths).
        positions: how tokens know where they are: ``sincos`` (DiT's fixed 2-D table added to the patches), ``rope``
            (rotary positions inside attention, FLUX) or ``none``.
        position_options: ``sincos``: ``base_size``, ``interpolation_scale``, ``max_size`` (PixArt/SD3 tables);
            ``rope``: ``theta``, ``axes_dims`` (FLUX).
    """

    preset: str | None = field(default=None, compare=False)
    input_size: int | None = None
    patch_size: int | None = None
    in_channels: int | None = None
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int | None = None
    learn_sigma: bool = True
    freq_shift: float = 0.0
    mlp_norm_eps: float = 1e-6
    qk_norm: bool | str = False
    attention: str = "full"
    attention_options: dict[str, Any] = field(default_factory=dict)
    mlp: str = "dense"
    mlp_options: dict[str, Any] = field(default_factory=dict)
    block: str = "dit"
    block_options: dict[str, Any] = field(default_factory=dict)
    head_dim: int | None = None
    mlp_hidden: int | None = None
    trunk: str = "blocks"
    trunk_options: dict[str, Any] = field(default_factory=dict)
    condition: str = "class"
    condition_options: dict[str, Any] = field(default_factory=dict)
    positions: str = "sincos"
    position_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sized = {**DEFAULTS, **(preset_values(self.preset) if self.preset else {})}
        for name, value in sized.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}; "
                             "pick a patch size that divides the image (or latent) size")  # fmt: skip
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by 4 for the 2-D position embedding")
        for name in ("head_dim", "mlp_hidden"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer, or None for the default")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                             "change num_heads (or set head_dim)")  # fmt: skip
        if self.head_dim == self.hidden_size // self.num_heads and self.hidden_size % self.num_heads == 0:
            self.head_dim = None  # the default: unpruned configs stay free of width keys
        if self.mlp_hidden == int(self.hidden_size * self.mlp_ratio):
            self.mlp_hidden = None
        self.attention_options, self.mlp_options = dict(self.attention_options), dict(self.mlp_options)
        self.trunk_options = dict(self.trunk_options)
        self.block_options = dict(self.block_options)
        self.condition_options, self.position_options = dict(self.condition_options), dict(self.position_options)
        if self.qk_norm not in (False, True, "layer", "rms"):
            raise ValueError(f"qk_norm={self.qk_norm!r} must be false, true (= 'layer') or 'rms'")
        if self.positions not in ("sincos", "rope", "none"):
            raise ValueError(f"positions={self.positions!r} must be 'sincos', 'rope' or 'none'")

    # ----------------------------------------------------------------------------------- derived sizes
    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def text_conditioned(self) -> bool:
        return self.condition == "text"

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden or int(self.hidden_size * self.mlp_ratio)

    # ----------------------------------------------------------------------------------- (de)serialising
    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON/YAML-safe) that :meth:`from_dict` turns back into an equal config."""
        return asdict(self)

    def to_record(self) -> dict[str, Any]:
        """What a file records (checkpoints, exports): :meth:`to_dict` with the text encoder's options pinned to the
        weights they give today (``ditlab.models.text.registry``), so the file reads captions as it was trained to."""
        return _text_options(self.to_dict(), "pinned_text_options")

    @staticmethod
    def upgrade_record(values: dict[str, Any]) -> dict[str, Any]:
        """A recorded config as today's layout: text-encoder options written before their kind was pinned get the
        options they meant then."""
        return _text_options(values, "options_before_pins")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DiTConfig:
        """A config from :meth:`to_dict` (or an older checkpoint's ``dit_config``); unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DiT config keys {unknown}; known: {sorted(known)} "
                             "(was it written by a newer ditlab?)")  # fmt: skip
        return cls(**values)

    def replace(self, **changes: Any) -> DiTConfig:
        """A copy with ``changes`` (every size is explicit by now, so the preset name is only a label)."""
        return DiTConfig.from_dict({**self.to_dict(), **changes})

    @classmethod
    def plain(cls, config: DiTConfig | None) -> DiTConfig:
        """``config`` as a plain ``DiTConfig`` (a CLI default may be a lazy stand-in); None is the default config."""
        return cls() if config is None else cls.from_dict(asdict(config))

    def build(self):
        """The :class:`~ditlab.models.dit.DiT` this config describes (freshly initialised)."""
        from ditlab.models.dit import DiT

        return DiT(self)


def _text_options(values: dict[str, Any], how: str) -> dict[str, Any]:
    """``values`` with its text encoder's options passed through ``ditlab.models.text.registry.<how>``."""
    options = values.get("condition_options") or {}
    if values.get("condition") != "text" or not options.get("encoder"):
        return values
    from ditlab.models.text import registry

    pinned = getattr(registry, how)(options["encoder"], options.get("encoder_options") or {})
    return {**values, "condition_options": {**options, "encoder_options": pinned}}
