"""diffusers' ``PixArtTransformer2DModel`` in and out of the ditlab core, exactly.

PixArt-alpha (Chen et al., "PixArt-alpha: Fast Training of Diffusion Transformer for Photorealistic Text-to-Image
Synthesis", 2023) and PixArt-Sigma (Chen et al., 2024) as diffusers ships them (checked against diffusers 0.42.1:
``transformers/pixart_transformer_2d.py``, ``attention.BasicTransformerBlock`` with ``norm_type='ada_norm_single'``,
``normalization.AdaLayerNormSingle``, ``embeddings.PixArtAlphaTextProjection``, ``embeddings.PatchEmbed`` and
``get_2d_sincos_pos_embed``). The ditlab network is a :class:`~ditlab.models.dit.DiT` with ``block: pixart``
(:mod:`ditlab.models.blocks.pixart`), ``condition: text`` with ``projection: mlp``, ``adaln: single`` and no pooled
vector, and PixArt's sin-cos table (``base_size`` = the token grid, diffusers' ``interpolation_scale``).

Calls: diffusers' ``model(x, encoder_hidden_states=T5 tokens, timestep=t, encoder_attention_mask=mask (1 keep /
0 pad))`` is ditlab's ``dit(x, t, TextFeatures(tokens, pooled=(B, 0), mask.bool()))``. **Time convention**: the ditlab
network receives the same timestep values as the diffusers model, DDPM steps 0..999 (the diffusers pipeline passes
its scheduler's timesteps; ditlab's ``GaussianDiffusion`` passes its integer steps), so no rescaling happens.

Names: ``adaln_single.emb.timestep_embedder.linear_{1,2}`` -> ``t_embedder.mlp.{0,2}``, ``adaln_single.linear`` ->
``y_embedder.t_block.1``, ``caption_projection.linear_{1,2}`` -> ``y_embedder.caption_projection.{0,2}``,
``scale_shift_table`` -> ``final_layer.scale_shift_table``, ``proj_out`` -> ``final_layer.linear``,
``pos_embed.proj`` -> ``x_embedder.proj``; in block ``i``: ``attn1.to_{q,k,v}`` fused into ``attn.qkv``,
``attn1.to_out.0`` -> ``attn.proj``, ``attn2.to_q`` -> ``cross_attn.q_linear``, ``attn2.to_{k,v}`` fused into
``cross_attn.kv_linear``, ``attn2.to_out.0`` -> ``cross_attn.proj``, ``ff.net.0.proj`` / ``ff.net.2`` ->
``mlp.fc1`` / ``mlp.fc2``. diffusers' position table is a non-persistent buffer (``pos_embed.pos_embed``): taken
when the state dict carries it, else ditlab's table of the same options (equal for integer-valued coordinates, and
to float rounding otherwise); it is never written back.

Refused in one line: what the core cannot express, e.g. ``use_additional_conditions`` (PixArt-alpha 1024's
resolution / aspect-ratio embedding, on by default when ``sample_size == 128``), affine norms, GEGLU feed-forwards,
gated (GLIGEN) attention, no caption projection, or a cross-attention width other than the hidden size.
"""

from __future__ import annotations

import torch

import ditlab.models.blocks.pixart  # noqa: F401 - registers the "pixart" block kind
from ditlab.models.config import DiTConfig
from ditlab.models.positions import position_table

CLASS_NAME = "PixArtTransformer2DModel"
DEFAULTS = {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8, "num_layers": 28,
            "dropout": 0.0, "norm_num_groups": 32, "cross_attention_dim": 1152, "attention_bias": True,
            "sample_size": 128, "patch_size": 2, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
            "upcast_attention": False, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
            "norm_eps": 1e-6, "interpolation_scale": None, "use_additional_conditions": None,
            "caption_channels": None, "attention_type": "default"}  # fmt: skip
"""``PixArtTransformer2DModel.__init__``'s defaults in diffusers 0.42.1 (a config.json may leave keys out)."""
REQUIRED = {"dropout": 0.0, "attention_bias": True, "activation_fn": "gelu-approximate", "upcast_attention": False,
            "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "attention_type": "default"}  # fmt: skip
"""Settings the ditlab core reproduces only at these values (dropout only matters in training)."""


def _full_config(config: dict) -> dict:
    """``config`` with diffusers' defaults for left-out keys; private keys (``_class_name``, ...) dropped."""
    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise ValueError(f"this config is a diffusers {name!r}, not a {CLASS_NAME}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DEFAULTS)
    if unknown:
        raise ValueError(f"{CLASS_NAME} config keys {unknown} are unknown to ditlab's converter (checked against "
                         "diffusers 0.42.1); it cannot vouch for an exact conversion")  # fmt: skip
    return {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}


def config_from_diffusers(config: dict, condition_options: dict | None = None) -> DiTConfig:
    """The :class:`DiTConfig` of a ``PixArtTransformer2DModel`` config (``dict(model.config)`` or its config.json).

    ``condition_options`` adds text-condition options the diffusers config does not carry (``encoder``,
    ``text_length`` for FLOP counts: 120 T5 tokens for PixArt-alpha, 300 for Sigma; ``dropout_prob``).
    """
    values = _full_config(dict(config))
    bad = {k: values[k] for k, v in REQUIRED.items() if values[k] != v}
    if bad:
        raise ValueError(f"this {CLASS_NAME} has {bad}; the ditlab 'pixart' block reproduces {REQUIRED} only")
    heads, head_dim, sample, patch = (values["num_attention_heads"], values["attention_head_dim"],
                                      values["sample_size"], values["patch_size"])  # fmt: skip
    hidden = heads * head_dim
    additional = values["use_additional_conditions"]
    if additional if additional is not None else sample == 128:
        raise ValueError(f"this {CLASS_NAME} uses additional conditions (PixArt-alpha's resolution and aspect-ratio "
                         "embedding; diffusers turns it on by default for sample_size 128), which the ditlab text "
                         "condition does not carry")  # fmt: skip
    if values["caption_channels"] is None:
        raise ValueError(f"this {CLASS_NAME} has no caption projection (caption_channels: null); the ditlab text "
                         "condition always projects the text tokens")  # fmt: skip
    if values["cross_attention_dim"] != hidden:
        raise ValueError(f"cross_attention_dim={values['cross_attention_dim']} differs from the hidden size {hidden}; "
                         "PixArt's cross-attention reads the projected caption at the hidden size")  # fmt: skip
    if sample % patch:
        raise ValueError(f"sample_size={sample} is not divisible by patch_size={patch}")
    in_channels = values["in_channels"]
    out_channels = in_channels if values["out_channels"] is None else values["out_channels"]
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"out_channels={out_channels} is neither in_channels={in_channels} nor twice it (learned "
                         "sigma); a ditlab DiT outputs one of the two")  # fmt: skip
    scale = values["interpolation_scale"]
    scale = scale if scale is not None else max(sample // 64, 1)
    eps = float(values["norm_eps"])
    options = {"text_dim": int(values["caption_channels"]), "projection": "mlp", "adaln": "single", "pooled_dim": 0,
               **(condition_options or {})}  # fmt: skip
    return DiTConfig(input_size=sample, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                     depth=values["num_layers"], num_heads=heads, mlp_ratio=4.0,
                     learn_sigma=out_channels == 2 * in_channels, block="pixart",
                     block_options={} if eps == 1e-6 else {"norm_eps": eps}, condition="text",
                     condition_options=options, positions="sincos",
                     position_options={"base_size": sample // patch, "interpolation_scale": scale})  # fmt: skip


def _check_expressible(config: DiTConfig) -> None:
    """Refuse, naming it, a ditlab config that ``PixArtTransformer2DModel`` cannot express."""
    options = config.condition_options
    position = config.position_options
    problems = {
        "block": (config.block, "pixart"), "attention": (config.attention, "full"), "mlp": (config.mlp, "dense"),
        "trunk": (config.trunk, "blocks"), "qk_norm": (config.qk_norm, False), "freq_shift": (config.freq_shift, 0.0),
        "head_dim": (config.head_dim, None), "mlp_hidden": (config.mlp_hidden, None),
        "mlp_ratio": (config.mlp_ratio, 4.0), "condition": (config.condition, "text"),
        "projection": (options.get("projection", "mlp"), "mlp"), "adaln": (options.get("adaln", "zero"), "single"),
        "pooled_dim": (int(options.get("pooled_dim", 0)), 0), "positions": (config.positions, "sincos"),
        "base_size": (position.get("base_size", config.grid_size), config.grid_size),
        "max_size": (position.get("max_size"), None),
    }  # fmt: skip
    bad = {name: have for name, (have, need) in problems.items() if have != need}
    if bad or config.attention_options or config.mlp_options:
        bad = bad or {"options": {**config.attention_options, **config.mlp_options}}
        raise ValueError(f"this network has {bad}, which diffusers' {CLASS_NAME} cannot express; export it with "
                         "`ditlab convert --format safetensors`")  # fmt: skip


def diffusers_config(config: DiTConfig) -> dict:
    """The ``PixArtTransformer2DModel`` config (``PixArtTransformer2DModel.from_config(...)``) of ``config``."""
    _check_expressible(config)
    return {"_class_name": CLASS_NAME, **DEFAULTS, "num_attention_heads": config.num_heads,
            "attention_head_dim": config.hidden_size // config.num_heads, "in_channels": config.in_channels,
            "out_channels": config.out_channels, "num_layers": config.depth, "cross_attention_dim": config.hidden_size,
            "sample_size": config.input_size, "patch_size": config.patch_size,
            "norm_eps": float(config.block_options.get("norm_eps", 1e-6)),
            "interpolation_scale": config.position_options.get("interpolation_scale", 1.0),
            "use_additional_conditions": False, "caption_channels": config.condition_options["text_dim"]}  # fmt: skip


def _pairs(config: DiTConfig) -> list[tuple[str, str]]:
    """``(ditlab prefix, diffusers prefix)`` of every linear / convolution that maps one to one."""
    pairs = [("x_embedder.proj", "pos_embed.proj"),
             ("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
             ("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
             ("y_embedder.t_block.1", "adaln_single.linear"),
             ("y_embedder.caption_projection.0", "caption_projection.linear_1"),
             ("y_embedder.caption_projection.2", "caption_projection.linear_2"),
             ("final_layer.linear", "proj_out")]  # fmt: skip
    for i in range(config.depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        pairs += [(ours + "attn.proj", theirs + "attn1.to_out.0"),
                  (ours + "cross_attn.q_linear", theirs + "attn2.to_q"),
                  (ours + "cross_attn.proj", theirs + "attn2.to_out.0"),
                  (ours + "mlp.fc1", theirs + "ff.net.0.proj"), (ours + "mlp.fc2", theirs + "ff.net.2")]  # fmt: skip
    return pairs


def _fused(config: DiTConfig) -> list[tuple[str, list[str]]]:
    """``(ditlab fused projection, [diffusers projections in its order])``."""
    fused = []
    for i in range(config.depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        fused += [(ours + "attn.qkv", [theirs + f"attn1.to_{x}" for x in "qkv"]),
                  (ours + "cross_attn.kv_linear", [theirs + "attn2.to_k", theirs + "attn2.to_v"])]  # fmt: skip
    return fused


def _tables(config: DiTConfig) -> list[tuple[str, str]]:
    """``(ditlab table, diffusers table)``: the head's ``(2, D)`` and every block's ``(6, D)``."""
    blocks = [
        (f"blocks.{i}.scale_shift_table", f"transformer_blocks.{i}.scale_shift_table")
        for i in range(config.depth)
    ]
    return [("final_layer.scale_shift_table", "scale_shift_table"), *blocks]


def state_from_diffusers(state: dict, config: DiTConfig) -> dict:
    """A ``PixArtTransformer2DModel`` state dict as the ditlab state dict of ``config`` (new tensors; strict: a
    missing or unconverted diffusers key is refused in one line)."""
    _check_expressible(config)
    state = dict(state)
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"the {CLASS_NAME} state dict lacks {key!r}; it does not fit this config (depth "
                             f"{config.depth}, width {config.hidden_size})")  # fmt: skip
        used.add(key)
        return state[key]

    ours: dict[str, torch.Tensor] = {}
    for mine, theirs in _pairs(config):
        for kind in ("weight", "bias"):
            ours[f"{mine}.{kind}"] = take(f"{theirs}.{kind}").clone()
    for mine, parts in _fused(config):
        for kind in ("weight", "bias"):
            ours[f"{mine}.{kind}"] = torch.cat([take(f"{part}.{kind}") for part in parts])
    for mine, theirs in _tables(config):
        ours[mine] = take(theirs).clone()
    if "pos_embed.pos_embed" in state:
        ours["pos_embed"] = take("pos_embed.pos_embed").clone()
    else:
        ours["pos_embed"] = position_table(config.hidden_size, config.grid_size, config.position_options)
    left = sorted(set(state) - used)
    if left:
        more = " ..." if len(left) > 3 else ""
        raise ValueError(f"the {CLASS_NAME} state dict holds {left[:3]}{more}, which the ditlab 'pixart' network "
                         "has no place for (additional conditions? another class?)")  # fmt: skip
    return ours


def state_to_diffusers(state: dict, config: DiTConfig) -> dict:
    """The ditlab state dict of ``config`` as a ``PixArtTransformer2DModel`` state dict (new tensors; the position
    table is dropped: diffusers rebuilds its non-persistent buffer from the config)."""
    _check_expressible(config)
    theirs: dict[str, torch.Tensor] = {}
    for mine, target in _pairs(config):
        for kind in ("weight", "bias"):
            theirs[f"{target}.{kind}"] = state[f"{mine}.{kind}"].clone()
    for mine, parts in _fused(config):
        for kind in ("weight", "bias"):
            for part, chunk in zip(parts, state[f"{mine}.{kind}"].chunk(len(parts), dim=0), strict=True):
                theirs[f"{part}.{kind}"] = chunk.clone()
    for mine, target in _tables(config):
        theirs[target] = state[mine].clone()
    return theirs
