"""diffusers' ``SD3Transformer2DModel`` in and out of the ditlab core, exactly.

Stable Diffusion 3's MM-DiT (Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis",
2024), as diffusers 0.42.1 implements it (``transformer_sd3.py``, ``JointTransformerBlock``,
``JointAttnProcessor2_0``, ``AdaLayerNormZero`` / ``AdaLayerNormContinuous``, ``PatchEmbed(pos_embed_max_size)``,
``CombinedTimestepTextProjEmbeddings``), is a ditlab network with ``block: mmdit`` (``block_options:
{context_pre_only: true}``, SD3's last block), ``condition: text`` (``projection: linear``: the
``context_embedder``; ``pooled_dim``: the pooled projection added to the timestep embedding), the sin-cos table on a
``pos_embed_max_size`` grid with its centre cropped (``position_options: {base_size, max_size}``) and no learned
sigma. The ditlab network is built for ``sample_size`` latents (diffusers crops the table for any size up to the
maximum; ditlab crops it once).

Time convention: diffusers' SD3 takes the scheduler's timestep ``sigma * 1000`` (FlowMatchEulerDiscreteScheduler) and
embeds it as is; the ditlab network takes the same number, ``t = 1000 * sigma``, for ``x_t = (1 - sigma) x_0 + sigma
noise`` and predicts the velocity ``noise - x_0`` as SD3 does: ditlab's ``FlowMatching(path="linear", t_scale=1000)``
(t = sigma) is its objective.

Layout differences the conversion reconciles (bitwise both ways): q, k, v fused into one ``qkv`` per stream;
``AdaLayerNormContinuous`` (the final norm; the text stream of the last block) gives scale then shift, ditlab's
shift then scale; ditlab keeps the cropped position table (``pos_embed``), diffusers the full one
(``pos_embed.pos_embed``, rebuilt by diffusers' own function on the way out with the crop written into its centre).
Refused in one line: SD3.5's dual-attention blocks (``dual_attention_layers``, a second self-attention in the image
stream the core does not express), ``out_channels`` other than ``in_channels``, and diffusers config keys newer than
0.42.1.

:mod:`ditlab.models.diffusers_t2i.flux` reuses the double-stream block mapping and the rule machinery here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ditlab.models.config import DiTConfig
from ditlab.models.positions import position_table, sincos_2d

EXACT_KEY = "_ditlab"
"""Private diffusers config entry: ditlab settings diffusers' config does not hold (text encoder, length, drop-out)."""
KEPT_OPTIONS = ("encoder", "encoder_options", "text_length", "dropout_prob")
DEFAULTS = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18, "attention_head_dim": 64,
            "num_attention_heads": 18, "joint_attention_dim": 4096, "caption_projection_dim": 1152,
            "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 96, "dual_attention_layers": (),
            "qk_norm": None}  # fmt: skip
"""``SD3Transformer2DModel.__init__``'s defaults in diffusers 0.42.1."""
QK_NORMS = {None: False, "rms_norm": "rms", "layer_norm": "layer"}

Tensors = list[torch.Tensor]


def same(tensors: Tensors) -> Tensors:
    return list(tensors)


@dataclass(frozen=True)
class Rule:
    """Tensors ``theirs`` (diffusers names) <-> ``ours`` (ditlab names): ``inward`` maps the first to the second,
    ``outward`` back; both exact (concatenations, splits, permutations, additions of zero)."""

    theirs: tuple[str, ...]
    ours: tuple[str, ...]
    inward: Callable[[Tensors], Tensors] = same
    outward: Callable[[Tensors], Tensors] = same


def rename(theirs: str, ours: str, kinds: tuple[str, ...] = ("weight", "bias")) -> list[Rule]:
    return [Rule((f"{theirs}.{kind}",), (f"{ours}.{kind}",)) for kind in kinds]


def fused(theirs: list[str], ours: str) -> list[Rule]:
    """Separate q, k, v linears <-> one fused ``qkv`` (rows q, then k, then v)."""
    count = len(theirs)
    return [Rule(tuple(f"{name}.{kind}" for name in theirs), (f"{ours}.{kind}",),
                 lambda parts: [torch.cat(parts, dim=0)], lambda parts: [p.contiguous() for p in
                                                                         parts[0].chunk(count, dim=0)])
            for kind in ("weight", "bias")]  # fmt: skip


def swap_halves(tensors: Tensors) -> Tensors:
    """``[scale; shift]`` rows <-> ``[shift; scale]`` (its own inverse)."""
    first, second = tensors[0].chunk(2, dim=0)
    return [torch.cat([second, first], dim=0)]


def swapped(theirs: str, ours: str) -> list[Rule]:
    """An ``AdaLayerNormContinuous`` linear (scale, shift) <-> a ditlab shift/scale modulation linear."""
    return [Rule((f"{theirs}.{kind}",), (f"{ours}.{kind}",), swap_halves, swap_halves) for kind in ("weight", "bias")]


def norm_kinds(qk_norm: bool | str) -> tuple[str, ...]:
    """The parameters of a q/k norm (none when off)."""
    if qk_norm in (True, "layer"):
        return ("weight", "bias")
    return ("weight",) if qk_norm == "rms" else ()


def embedder_rules() -> list[Rule]:
    """The timestep MLP, the pooled projection and the context embedder (SD3 and FLUX alike)."""
    return [*rename("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
            *rename("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
            *rename("time_text_embed.text_embedder.linear_1", "y_embedder.pooled_projection.0"),
            *rename("time_text_embed.text_embedder.linear_2", "y_embedder.pooled_projection.2"),
            *rename("context_embedder", "y_embedder.caption_projection"),
            *swapped("norm_out.linear", "final_layer.adaLN_modulation.1")]  # fmt: skip


def double_block_rules(theirs: str, ours: str, qk_norm: bool | str, context_pre_only: bool) -> list[Rule]:
    """A ``JointTransformerBlock`` / ``FluxTransformerBlock`` <-> an ``mmdit`` block (prefixes end with a dot)."""
    attn = f"{theirs}attn."
    rules = [*rename(f"{theirs}norm1.linear", f"{ours}adaLN_modulation.1"),
             *fused([f"{attn}to_q", f"{attn}to_k", f"{attn}to_v"], f"{ours}attn.image.qkv"),
             *fused([f"{attn}add_q_proj", f"{attn}add_k_proj", f"{attn}add_v_proj"], f"{ours}attn.context_qkv"),
             *rename(f"{attn}to_out.0", f"{ours}attn.image.proj"),
             *rename(f"{attn}norm_q", f"{ours}attn.image.q_norm", norm_kinds(qk_norm)),
             *rename(f"{attn}norm_k", f"{ours}attn.image.k_norm", norm_kinds(qk_norm)),
             *rename(f"{attn}norm_added_q", f"{ours}attn.context_q_norm", norm_kinds(qk_norm)),
             *rename(f"{attn}norm_added_k", f"{ours}attn.context_k_norm", norm_kinds(qk_norm)),
             *rename(f"{theirs}ff.net.0.proj", f"{ours}mlp.fc1"),
             *rename(f"{theirs}ff.net.2", f"{ours}mlp.fc2")]  # fmt: skip
    if context_pre_only:
        return [*rules, *swapped(f"{theirs}norm1_context.linear", f"{ours}context_adaLN_modulation.1")]
    return [*rules, *rename(f"{theirs}norm1_context.linear", f"{ours}context_adaLN_modulation.1"),
            *rename(f"{attn}to_add_out", f"{ours}attn.context_proj"),
            *rename(f"{theirs}ff_context.net.0.proj", f"{ours}context_mlp.fc1"),
            *rename(f"{theirs}ff_context.net.2", f"{ours}context_mlp.fc2")]  # fmt: skip


def apply_rules(state: dict, rules: list[Rule], inward: bool, what: str) -> dict[str, torch.Tensor]:
    """``state`` converted by ``rules`` (diffusers -> ditlab when ``inward``); every tensor must be used once."""
    source = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    converted, used = {}, set()
    for rule in rules:
        names, targets = (rule.theirs, rule.ours) if inward else (rule.ours, rule.theirs)
        missing = [name for name in names if name not in source]
        if missing:
            raise ValueError(f"not a {what} state dict of this config: {missing[0]!r} is missing "
                             f"({len(missing)} of the tensors it needs)")  # fmt: skip
        outputs = (rule.inward if inward else rule.outward)([source[name] for name in names])
        converted.update(zip(targets, outputs))
        used.update(names)
    unused = sorted(set(source) - used)
    if unused:
        raise ValueError(f"the {what} state dict has {len(unused)} tensors this config does not hold, e.g. "
                         f"{unused[0]!r} (a different architecture or size)")  # fmt: skip
    return converted


# ----------------------------------------------------------------------------------- configs
def read_config(config: dict, defaults: dict, name: str) -> tuple[dict, dict]:
    """``config`` over the class defaults, and its private ditlab entry; keys newer than 0.42.1 refused."""
    values = {**defaults, **{k: v for k, v in dict(config).items() if not k.startswith("_")}}
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"{name} config keys {unknown} are unknown to ditlab's converter (checked against "
                         f"diffusers 0.42.1; known: {sorted(defaults)})")  # fmt: skip
    return values, dict(config.get(EXACT_KEY) or {})


def text_options(joint_dim: int, pooled_dim: int, exact: dict) -> dict:
    kept = {key: exact[key] for key in KEPT_OPTIONS if key in exact}
    return {"text_dim": int(joint_dim), "pooled_dim": int(pooled_dim), "projection": "linear", **kept}


def check_text_network(config: DiTConfig, name: str) -> list[str]:
    """What a ditlab config has that an SD3/FLUX transformer cannot hold (empty when it converts)."""
    options = config.condition_options
    heads, head_dim = config.num_heads, config.attention_head_dim
    problems = [
        (not config.text_conditioned, f"condition {config.condition!r} (needs text)"),
        (options.get("projection", "mlp") != "linear", "a text projection other than 'linear'"),
        (options.get("adaln", "zero") != "zero", "adaLN-single"),
        (int(options.get("pooled_dim", 0)) < 1, "no pooled text projection (pooled_dim 0)"),
        (config.attention != "full" or config.attention_options, f"attention {config.attention!r}"),
        (config.mlp != "dense" or config.mlp_options or config.mlp_width != 4 * config.hidden_size,
         f"MLP {config.mlp!r} of width {config.mlp_width} (needs dense, 4 x hidden)"),
        (heads * head_dim != config.hidden_size, f"{heads} heads of {head_dim} for width {config.hidden_size}"),
        (config.learn_sigma, "learn_sigma (a second output half)"),
        (config.freq_shift != 0 or config.mlp_norm_eps != 1e-6, "freq_shift / mlp_norm_eps other than 0 / 1e-6"),
        (config.trunk != "blocks", f"trunk {config.trunk!r}"),
    ]  # fmt: skip
    return [f"{name} cannot hold {what}" for bad, what in problems if bad]


def refuse(problems: list[str]) -> None:
    if problems:
        raise ValueError(f"{problems[0]}; convert a network built by config_from_diffusers"
                         + (f" ({len(problems) - 1} more)" if len(problems) > 1 else ""))  # fmt: skip


def exact_entry(config: DiTConfig, **extra) -> dict:
    kept = {key: config.condition_options[key] for key in KEPT_OPTIONS if key in config.condition_options}
    return {**kept, **extra}


def config_from_diffusers(config: dict) -> DiTConfig:
    """The ditlab config of an ``SD3Transformer2DModel`` config (``model.config`` or its ``config.json``)."""
    values, exact = read_config(config, DEFAULTS, "SD3Transformer2DModel")
    if tuple(values["dual_attention_layers"] or ()):
        raise ValueError("SD3.5's dual-attention blocks (dual_attention_layers) are not expressed by the ditlab core "
                         "(a second image self-attention per block); SD3 and SD3.5 without them convert")  # fmt: skip
    out_channels = values["out_channels"] or values["in_channels"]
    if out_channels != values["in_channels"]:
        raise ValueError(f"out_channels={out_channels} differs from in_channels={values['in_channels']}; ditlab "
                         "networks output in_channels (or twice that with learn_sigma)")  # fmt: skip
    if values["qk_norm"] not in QK_NORMS:
        raise ValueError(f"qk_norm={values['qk_norm']!r} is not converted; known: {sorted(map(str, QK_NORMS))}")
    heads, head_dim = values["num_attention_heads"], values["attention_head_dim"]
    if values["caption_projection_dim"] != heads * head_dim:
        raise ValueError(f"caption_projection_dim={values['caption_projection_dim']} differs from the width "
                         f"{heads * head_dim}; SD3's joint blocks need them equal")  # fmt: skip
    grid = values["sample_size"] // values["patch_size"]
    maximum = values["pos_embed_max_size"]
    positions = {"base_size": grid, "max_size": int(maximum)} if maximum else {}
    return DiTConfig(
        input_size=values["sample_size"], patch_size=values["patch_size"], in_channels=values["in_channels"],
        hidden_size=heads * head_dim, depth=values["num_layers"], num_heads=heads, mlp_ratio=4.0, learn_sigma=False,
        qk_norm=QK_NORMS[values["qk_norm"]], block="mmdit", block_options={"context_pre_only": True},
        condition="text", condition_options=text_options(values["joint_attention_dim"],
                                                         values["pooled_projection_dim"], exact),
        positions="sincos", position_options=positions,
    )  # fmt: skip


def diffusers_config(config: DiTConfig) -> dict:
    """The ``SD3Transformer2DModel`` config (``SD3Transformer2DModel.from_config(...)``) of a ditlab config."""
    problems = check_text_network(config, "SD3Transformer2DModel")
    options, grid = config.position_options, config.grid_size
    problems += [f"SD3Transformer2DModel cannot hold {what}" for bad, what in [
        (config.block != "mmdit" or config.block_options != {"context_pre_only": True},
         f"block {config.block!r} with {config.block_options} (needs mmdit with context_pre_only: true)"),
        (config.positions != "sincos", f"positions {config.positions!r}"),
        (options.get("interpolation_scale", 1.0) != 1.0, "an interpolation_scale"),
        (options.get("base_size", options.get("max_size", grid)) != grid, "a base_size other than the token grid"),
    ] if bad]  # fmt: skip
    refuse(problems)
    qk_norm = {False: None, True: "layer_norm", "layer": "layer_norm", "rms": "rms_norm"}[config.qk_norm]
    return {"sample_size": config.input_size, "patch_size": config.patch_size, "in_channels": config.in_channels,
            "num_layers": config.depth, "attention_head_dim": config.attention_head_dim,
            "num_attention_heads": config.num_heads, "joint_attention_dim": config.condition_options["text_dim"],
            "caption_projection_dim": config.hidden_size,
            "pooled_projection_dim": int(config.condition_options["pooled_dim"]),
            "out_channels": config.in_channels, "pos_embed_max_size": options.get("max_size"),
            "dual_attention_layers": (), "qk_norm": qk_norm, EXACT_KEY: exact_entry(config)}  # fmt: skip


# ----------------------------------------------------------------------------------- weights
def state_rules(config: DiTConfig) -> list[Rule]:
    rules = [*rename("pos_embed.proj", "x_embedder.proj"), *embedder_rules(),
             *rename("proj_out", "final_layer.linear")]  # fmt: skip
    for index in range(config.depth):
        rules += double_block_rules(f"transformer_blocks.{index}.", f"blocks.{index}.", config.qk_norm,
                                    index == config.depth - 1)  # fmt: skip
    return rules


def crop(table: torch.Tensor, side: int, grid: int) -> torch.Tensor:
    """The centre ``grid x grid`` of a ``(1, side^2, D)`` table, as ``(1, grid^2, D)``."""
    start = (side - grid) // 2
    square = table.reshape(side, side, -1)[start : start + grid, start : start + grid]
    return square.reshape(1, grid * grid, -1).contiguous()


def full_table(config: DiTConfig, side: int) -> torch.Tensor:
    """diffusers' ``(1, side^2, D)`` table (its own function, so the round trip is bitwise; ditlab's without it)."""
    dim, base = config.hidden_size, config.grid_size
    try:
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        table = get_2d_sincos_pos_embed(dim, side, base_size=base, interpolation_scale=1.0, output_type="pt")
        return table.float()[None]
    except ImportError:
        return torch.from_numpy(sincos_2d(dim, side, base_size=base)).float()[None]


def state_from_diffusers(state: dict, config: DiTConfig) -> dict[str, torch.Tensor]:
    """An ``SD3Transformer2DModel`` state dict as the state dict of ``DiT(config)`` (``config_from_diffusers``)."""
    state = dict(state)
    side, grid = config.position_options.get("max_size"), config.grid_size
    table = state.pop("pos_embed.pos_embed", None)
    ours = apply_rules(state, state_rules(config), inward=True, what="SD3Transformer2DModel")
    if side and table is not None:
        if table.shape[-2] != side * side:
            raise ValueError(f"pos_embed.pos_embed has {table.shape[-2]} positions, not pos_embed_max_size^2 = "
                             f"{side * side}")  # fmt: skip
        ours["pos_embed"] = crop(table, side, grid)
    else:
        ours["pos_embed"] = position_table(config.hidden_size, grid, config.position_options)
    return ours


def state_to_diffusers(state: dict, config: DiTConfig) -> dict[str, torch.Tensor]:
    """The state dict of ``DiT(config)`` as an ``SD3Transformer2DModel`` state dict (``diffusers_config``)."""
    diffusers_config(config)  # refuses what SD3 cannot hold
    state = dict(state)
    table = state.pop("pos_embed")
    theirs = apply_rules(state, state_rules(config), inward=False, what="ditlab mmdit")
    side, grid = config.position_options.get("max_size"), config.grid_size
    if side:
        full = full_table(config, side).to(table.dtype).reshape(side, side, -1).clone()
        start = (side - grid) // 2
        full[start : start + grid, start : start + grid] = table.reshape(grid, grid, -1)
        theirs["pos_embed.pos_embed"] = full.reshape(1, side * side, -1)
    return theirs
