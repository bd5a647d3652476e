"""diffusers' ``FluxTransformer2DModel`` in and out of the ditlab core, exactly.

FLUX.1 (Black Forest Labs, 2024: the MM-DiT of Esser et al., 2024, with rotary positions and single-stream parallel
blocks), as diffusers 0.42.1 implements it (``transformer_flux.py``: ``FluxTransformerBlock``,
``FluxSingleTransformerBlock``, ``FluxAttnProcessor``, ``FluxPosEmbed``; ``AdaLayerNormZero`` /
``AdaLayerNormZeroSingle`` / ``AdaLayerNormContinuous``; ``CombinedTimestepTextProjEmbeddings``), is a ditlab network
with ``block: flux`` (``block_options: {double: num_layers}``: :mod:`ditlab.models.blocks.flux`), ``condition: text``
(``projection: linear``, ``pooled_dim``), ``positions: rope`` (``theta`` 10000, ``axes_dims = axes_dims_rope``:
image ids ``(0, row, column)``, text ids zero as the FLUX pipelines build them), RMS q/k norms and no learned sigma.

Conventions at the edge:

- **latents**: FLUX's transformer reads 2x2-packed latents ``(B, (H/2)(W/2), 4C)`` through a linear ``x_embedder``
  (the pipeline packs channel, row, column); the ditlab network reads the unpacked latents ``(B, C, H, W)`` through
  its stride-2 convolution (the linear's weight reshaped to ``(D, C, 2, 2)``) and outputs unpacked latents (the rows of
  ``proj_out`` permuted from FLUX's ``(c, row, column)`` to ditlab's ``(row, column, c)`` unpatchify order). The
  latent side is not in diffusers' config: ``config_from_diffusers(config, input_size=...)`` takes it (default: the
  private ``_ditlab`` entry ``diffusers_config`` writes, else 128, FLUX.1's 1024-pixel latents).
- **time**: FLUX's transformer takes ``t = sigma`` in [0, 1] and multiplies it by 1000 inside; the ditlab network
  takes ``t = 1000 * sigma`` (the same number its timestep embedder sees) and predicts FLUX's velocity: ditlab's
  ``FlowMatching(path="linear", t_scale=1000)`` (t = sigma) is its objective.
- **single blocks**: FLUX's ``proj_out`` over ``[attention; MLP hidden]`` is split into the attention's ``proj``
  (first columns, with the bias) and the MLP's ``fc2`` (the rest, zero bias); on the way out the two biases are
  added (bitwise for a converted model since ``b + 0 = b``; a ditlab-trained ``fc2`` bias is folded in).

Refused in one line: guidance-distilled models (``guidance_embeds: true``, FLUX.1-dev: the guidance scale is a
second embedded input the core's ``dit(x, t, text)`` does not take), ``patch_size`` other than 1, ``out_channels``
other than ``in_channels``.
"""

from __future__ import annotations

import torch

from ditlab.models.config import DiTConfig
from ditlab.models.diffusers_t2i.sd3 import (
    EXACT_KEY,
    Rule,
    apply_rules,
    check_text_network,
    double_block_rules,
    embedder_rules,
    exact_entry,
    read_config,
    refuse,
    rename,
    text_options,
)

DEFAULTS = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)}  # fmt: skip
"""``FluxTransformer2DModel.__init__``'s defaults in diffusers 0.42.1."""
THETA = 10000  # FluxPosEmbed's theta, fixed by FluxTransformer2DModel
DEFAULT_INPUT_SIZE = 128  # FLUX.1's latents at 1024 x 1024 pixels (VAE factor 8)


def config_from_diffusers(config: dict, input_size: int | None = None) -> DiTConfig:
    """The ditlab config of a ``FluxTransformer2DModel`` config, for ``input_size`` x ``input_size`` latents."""
    values, exact = read_config(config, DEFAULTS, "FluxTransformer2DModel")
    if values["guidance_embeds"]:
        raise ValueError("guidance-distilled FLUX (guidance_embeds: true, e.g. FLUX.1-dev) embeds the guidance scale "
                         "as a second input the ditlab core does not take; FLUX.1-schnell-style models "
                         "convert")  # fmt: skip
    if values["patch_size"] != 1 or values["in_channels"] % 4:
        raise ValueError(f"FLUX with patch_size={values['patch_size']} and in_channels={values['in_channels']} is "
                         "not converted: ditlab reads FLUX's 2x2-packed latents (patch_size 1, 4 x C "
                         "channels)")  # fmt: skip
    if (values["out_channels"] or values["in_channels"]) != values["in_channels"]:
        raise ValueError(f"out_channels={values['out_channels']} differs from in_channels={values['in_channels']}")
    heads, head_dim = values["num_attention_heads"], values["attention_head_dim"]
    double, single = values["num_layers"], values["num_single_layers"]
    return DiTConfig(
        input_size=int(input_size or exact.get("input_size", DEFAULT_INPUT_SIZE)), patch_size=2,
        in_channels=values["in_channels"] // 4, hidden_size=heads * head_dim, depth=double + single, num_heads=heads,
        mlp_ratio=4.0, learn_sigma=False, qk_norm="rms", block="flux", block_options={"double": double},
        condition="text", condition_options=text_options(values["joint_attention_dim"],
                                                         values["pooled_projection_dim"], exact),
        positions="rope", position_options={"theta": THETA, "axes_dims": [int(d) for d in values["axes_dims_rope"]]},
    )  # fmt: skip


def double_count(config: DiTConfig) -> int:
    return 0 if config.block == "flux-single" else int(config.block_options.get("double", 0))


def diffusers_config(config: DiTConfig) -> dict:
    """The ``FluxTransformer2DModel`` config (``FluxTransformer2DModel.from_config(...)``) of a ditlab config."""
    problems = check_text_network(config, "FluxTransformer2DModel")
    options = config.position_options
    axes = options.get("axes_dims")
    problems += [f"FluxTransformer2DModel cannot hold {what}" for bad, what in [
        (config.block not in ("flux", "flux-single"), f"block {config.block!r} (needs flux or flux-single)"),
        (config.patch_size != 2, f"patch_size {config.patch_size} (FLUX packs 2x2 patches)"),
        (config.positions != "rope" or float(options.get("theta", THETA)) != THETA or axes is None or len(axes) != 3,
         f"positions {config.positions!r} {options} (needs rope, theta {THETA}, three axes_dims)"),
        (config.qk_norm != "rms", f"qk_norm {config.qk_norm!r} (FLUX has RMS q/k norms)"),
    ] if bad]  # fmt: skip
    refuse(problems)
    return {"patch_size": 1, "in_channels": 4 * config.in_channels, "out_channels": 4 * config.in_channels,
            "num_layers": double_count(config), "num_single_layers": config.depth - double_count(config),
            "attention_head_dim": config.attention_head_dim, "num_attention_heads": config.num_heads,
            "joint_attention_dim": config.condition_options["text_dim"],
            "pooled_projection_dim": int(config.condition_options["pooled_dim"]), "guidance_embeds": False,
            "axes_dims_rope": tuple(int(d) for d in axes),
            EXACT_KEY: exact_entry(config, input_size=config.input_size)}  # fmt: skip


# ----------------------------------------------------------------------------------- weights
def patch_rule(channels: int) -> Rule:
    """FLUX's packed-latent linear ``(D, 4C)`` <-> the patch convolution ``(D, C, 2, 2)`` (same order c, row, col)."""
    return Rule(("x_embedder.weight",), ("x_embedder.proj.weight",),
                lambda parts: [parts[0].reshape(parts[0].shape[0], channels, 2, 2)],
                lambda parts: [parts[0].reshape(parts[0].shape[0], 4 * channels)])  # fmt: skip


def unpack_rows(tensor: torch.Tensor, channels: int) -> torch.Tensor:
    """``proj_out`` rows in FLUX's ``(c, row, col)`` order -> ditlab's ``(row, col, c)``."""
    return tensor.reshape(channels, 2, 2, *tensor.shape[1:]).permute(1, 2, 0, *range(3, tensor.dim() + 2)).reshape(
        tensor.shape).contiguous()  # fmt: skip


def pack_rows(tensor: torch.Tensor, channels: int) -> torch.Tensor:
    """The inverse of :func:`unpack_rows`."""
    return tensor.reshape(2, 2, channels, *tensor.shape[1:]).permute(2, 0, 1, *range(3, tensor.dim() + 2)).reshape(
        tensor.shape).contiguous()  # fmt: skip


def head_rules(channels: int) -> list[Rule]:
    return [Rule((f"proj_out.{kind}",), (f"final_layer.linear.{kind}",),
                 lambda parts: [unpack_rows(parts[0], channels)], lambda parts: [pack_rows(parts[0], channels)])
            for kind in ("weight", "bias")]  # fmt: skip


def split_output(parts: list[torch.Tensor], width: int) -> list[torch.Tensor]:
    """``proj_out`` weight, bias -> attention proj weight, bias; MLP fc2 weight, zero bias."""
    weight, bias = parts
    return [weight[:, :width].contiguous(), bias, weight[:, width:].contiguous(), torch.zeros_like(bias)]


def join_output(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    attention_weight, attention_bias, mlp_weight, mlp_bias = parts
    return [torch.cat([attention_weight, mlp_weight], dim=1), attention_bias + mlp_bias]


def single_block_rules(theirs: str, ours: str, width: int) -> list[Rule]:
    """A ``FluxSingleTransformerBlock`` <-> a ditlab single block (prefixes end with a dot)."""
    attn = f"{theirs}attn."
    return [*rename(f"{theirs}norm.linear", f"{ours}adaLN_modulation.1"),
            *[Rule(tuple(f"{attn}to_{x}.{kind}" for x in "qkv"), (f"{ours}attn.qkv.{kind}",),
                   lambda parts: [torch.cat(parts, dim=0)],
                   lambda parts: [p.contiguous() for p in parts[0].chunk(3, dim=0)]) for kind in ("weight", "bias")],
            *rename(f"{attn}norm_q", f"{ours}attn.q_norm", ("weight",)),
            *rename(f"{attn}norm_k", f"{ours}attn.k_norm", ("weight",)),
            *rename(f"{theirs}proj_mlp", f"{ours}mlp.fc1"),
            Rule((f"{theirs}proj_out.weight", f"{theirs}proj_out.bias"),
                 (f"{ours}attn.proj.weight", f"{ours}attn.proj.bias", f"{ours}mlp.fc2.weight", f"{ours}mlp.fc2.bias"),
                 lambda parts: split_output(parts, width), join_output)]  # fmt: skip


def state_rules(config: DiTConfig) -> list[Rule]:
    double = double_count(config)
    rules = [patch_rule(config.in_channels), *rename("x_embedder", "x_embedder.proj", ("bias",)), *embedder_rules(),
             *head_rules(config.in_channels)]  # fmt: skip
    width = config.num_heads * config.attention_head_dim
    for index in range(config.depth):
        if index < double:
            rules += double_block_rules(f"transformer_blocks.{index}.", f"blocks.{index}.", "rms", False)
        else:
            rules += single_block_rules(f"single_transformer_blocks.{index - double}.", f"blocks.{index}.", width)
    return rules


def state_from_diffusers(state: dict, config: DiTConfig) -> dict[str, torch.Tensor]:
    """A ``FluxTransformer2DModel`` state dict as the state dict of ``DiT(config)`` (``config_from_diffusers``)."""
    return apply_rules(state, state_rules(config), inward=True, what="FluxTransformer2DModel")


def state_to_diffusers(state: dict, config: DiTConfig) -> dict[str, torch.Tensor]:
    """The state dict of ``DiT(config)`` as a ``FluxTransformer2DModel`` state dict (``diffusers_config``)."""
    diffusers_config(config)  # refuses what FLUX cannot hold
    return apply_rules(state, state_rules(config), inward=False, what="ditlab flux")
