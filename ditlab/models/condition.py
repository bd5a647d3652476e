"""The condition slot: what a network is conditioned on, and what its blocks and head read of it.

``DiTConfig.condition`` names a kind: ``class`` (DiT's label table with a null class; the blocks read one vector
``(B, D)``) or ``text``, which turns a text encoder's :class:`~ditlab.models.text.features.TextFeatures` into a
:class:`TextCondition`: the adaLN vector (timestep embedding, plus the projected pooled text where the network uses
it), the text tokens projected to the network width, their mask, and PixArt's shared modulation. The text-to-image
designs it covers:

- PixArt-alpha/Sigma (Chen et al., 2023/2024): T5 tokens through a two-layer GELU(tanh) projection, cross-attended
  by every block; no pooled vector; adaLN-single: one ``Linear(SiLU(t_emb))`` to ``6 D`` shared by all blocks, each
  block adding its own learned ``(6, D)`` table (``adaln: single``).
- SD3 (Esser et al., 2024) and FLUX.1: tokens through one linear layer (``context_embedder``), the pooled CLIP vector
  through a two-layer SiLU MLP added to the timestep embedding; adaLN-Zero per block and per stream.

Caption drop-out and guidance replace rows by the empty caption's features (``TextFeatures.where``), as PixArt and SD3
encode the null condition, so the network has no learned null token. Checked against diffusers 0.42.1
(``PixArtAlphaTextProjection``, ``AdaLayerNormSingle``, ``CombinedTimestepTextProjEmbeddings``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ditlab.models.components import register_condition
from ditlab.models.config import DiTConfig
from ditlab.models.text.features import TextFeatures


@dataclass(frozen=True)
class TextCondition:
    """What the blocks and the head of a text-conditioned network read, for a batch of ``B`` rows."""

    vector: torch.Tensor
    """``(B, D)``: the adaLN input (timestep embedding, plus the projected pooled text where used)."""
    tokens: torch.Tensor
    """``(B, L, D)``: the text tokens at the network width (cross-attention keys, or the text stream's start)."""
    mask: torch.Tensor
    """``(B, L)`` bool: real tokens (True) and padding (False)."""
    modulation: torch.Tensor | None = None
    """``(B, 6 D)``: PixArt's shared adaLN-single modulation (None for per-block adaLN)."""

    def __len__(self) -> int:
        return len(self.vector)

    def __getitem__(self, rows) -> TextCondition:
        """The condition of batch ``rows`` (a trunk that runs a block on some images only)."""
        return TextCondition(self.vector[rows], self.tokens[rows], self.mask[rows],
                             None if self.modulation is None else self.modulation[rows])  # fmt: skip

    def with_tokens(self, tokens: torch.Tensor) -> TextCondition:
        return replace(self, tokens=tokens)


def condition_vector(cond: torch.Tensor | TextCondition) -> torch.Tensor:
    """The ``(B, D)`` adaLN input of either condition kind."""
    return cond.vector if isinstance(cond, TextCondition) else cond


TEXT_OPTIONS = {"encoder", "encoder_options", "text_dim", "pooled_dim", "text_length", "projection", "adaln",
                "dropout_prob", "projection_init"}  # fmt: skip


class TextEmbedder(nn.Module):
    """``TextFeatures`` (+ the timestep embedding) -> :class:`TextCondition`.

    Options (``DiTConfig.condition_options``): ``encoder`` / ``encoder_options`` (the frozen text encoder kind that
    feeds the network, used by training and sampling, never stored with it), ``text_dim`` (its token width,
    required), ``pooled_dim`` (its pooled width; 0: not used), ``text_length`` (its padded length, for FLOP counts),
    ``projection`` (``mlp``: PixArt's GELU(tanh) MLP; ``linear``: SD3/FLUX's ``context_embedder``), ``adaln``
    (``zero``: per block; ``single``: PixArt), ``dropout_prob`` (caption drop-out in training, default 0.1) and
    ``projection_init`` (``normal``: PixArt's N(0, 0.02), the default; ``xavier``: the DiT loop's Xavier-uniform).

    Why ``xavier`` exists: N(0, 0.02) is sized for T5-XXL's 4,096-wide tokens (gain ``sqrt(4096) * 0.02 = 1.3`` per
    layer). On a 64-wide text tower and a 128-wide network the two layers of the caption MLP shrink the tokens about
    50-fold (measured: scene-CLIP tokens of std 0.95 come out at std 0.012, still so after 2,000 steps), and PixArt's
    cross-attention reads them without a norm, so its keys and values start, and stay, near zero. MM-DiT blocks put a
    LayerNorm on the text stream, which undoes the scale. (Measured on the digit scenes: this option raises the
    caption's early effect on the prediction, but an epsilon-trained PixArt still ignored captions with it; trained
    with rectified flow it follows them, ``configs/pixart.yaml``.)
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        options = dict(config.condition_options)
        unknown = sorted(set(options) - TEXT_OPTIONS)
        if unknown:
            raise ValueError(f"unknown text condition options {unknown}; known: {sorted(TEXT_OPTIONS)}")
        if not isinstance(options.get("text_dim"), int) or options["text_dim"] < 1:
            raise ValueError("a text-conditioned network needs condition_options.text_dim: the token width of its "
                             "text encoder (e.g. 4096 for T5-XXL, the scene CLIP's text width)")  # fmt: skip
        projection, adaln = options.get("projection", "mlp"), options.get("adaln", "zero")
        if projection not in ("mlp", "linear") or adaln not in ("zero", "single"):
            raise ValueError(f"condition_options projection={projection!r} must be 'mlp' or 'linear', "
                             f"adaln={adaln!r} 'zero' or 'single'")  # fmt: skip
        hidden, text_dim, pooled_dim = config.hidden_size, options["text_dim"], int(options.get("pooled_dim", 0))
        self.encoder = options.get("encoder")
        self.encoder_options = dict(options.get("encoder_options", {}))
        self.text_length = int(options.get("text_length", 0))
        self.dropout_prob = float(options.get("dropout_prob", 0.1))
        self.adaln = adaln
        self.projection_init = options.get("projection_init", "normal")
        if self.projection_init not in ("normal", "xavier"):
            raise ValueError(f"condition_options projection_init={self.projection_init!r} must be 'normal' (PixArt's "
                             f"N(0, 0.02)) or 'xavier'")  # fmt: skip
        if projection == "mlp":
            self.caption_projection = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(approximate="tanh"),
                                                    nn.Linear(hidden, hidden))  # fmt: skip
        else:
            self.caption_projection = nn.Linear(text_dim, hidden)
        self.pooled_projection = (nn.Sequential(nn.Linear(pooled_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                                  if pooled_dim else None)  # fmt: skip
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden)) if adaln == "single" else None

    def initialize(self) -> None:
        """PixArt's initialisation of the text path: N(0, 0.02) projections (the DiT loop has made them Xavier; with
        ``projection_init: xavier`` the caption and pooled projections keep that)."""
        projections = (self.caption_projection, self.pooled_projection) if self.projection_init == "normal" else ()
        for module in (*projections, self.t_block):
            for layer in [] if module is None else [m for m in module.modules() if isinstance(m, nn.Linear)]:
                nn.init.normal_(layer.weight, std=0.02)

    def condition(self, t_emb: torch.Tensor, text: TextFeatures,
                  force_drop_ids: torch.Tensor | None = None) -> TextCondition:  # fmt: skip
        """The condition of ``text`` at timestep embedding ``t_emb (B, D)``; ``force_drop_ids (B,)`` (1 = empty
        caption) or, in training mode, drop-out at ``dropout_prob`` replaces captions by the empty one. Runs through
        ``forward``, so a sharded (FSDP2) embedder gathers its weights."""
        return self(t_emb, text, force_drop_ids)

    def forward(self, t_emb: torch.Tensor, text: TextFeatures,
                force_drop_ids: torch.Tensor | None = None) -> TextCondition:  # fmt: skip
        if not isinstance(text, TextFeatures):
            raise ValueError(f"this network is text-conditioned: pass TextFeatures (its text encoder's output), not "
                             f"{type(text).__name__}")  # fmt: skip
        if force_drop_ids is not None:
            text = text.where(force_drop_ids == 1)
        elif self.training and self.dropout_prob > 0:
            text = text.where(torch.rand(len(text), device=t_emb.device) < self.dropout_prob)
        dtype = self.caption_projection_dtype
        vector = t_emb
        if self.pooled_projection is not None:
            vector = vector + self.pooled_projection(text.pooled.to(dtype))
        modulation = self.t_block(t_emb) if self.t_block is not None else None
        return TextCondition(vector, self.caption_projection(text.tokens.to(dtype)), text.mask.to(t_emb.device),
                             modulation)  # fmt: skip

    def macs(self) -> int:
        """Multiply-accumulates per image of the text path: the caption projection over ``text_length`` tokens, the
        pooled projection and the shared adaLN-single linear (the frozen text encoder is not counted)."""
        def linears(module: nn.Module | None) -> int:
            return 0 if module is None else sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))

        return self.text_length * linears(self.caption_projection) + linears(self.pooled_projection) + linears(
            self.t_block)

    @property
    def caption_projection_dtype(self) -> torch.dtype:
        return next(self.caption_projection.parameters()).dtype


@register_condition("text")
def text_condition(config: DiTConfig) -> TextEmbedder:
    return TextEmbedder(config)
