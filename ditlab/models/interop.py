"""Public DiT checkpoints in, diffusers' ``DiTTransformer2DModel`` in and out, safetensors exports.

Sources: the facebookresearch/DiT checkpoint layout of Peebles & Xie, "Scalable Diffusion Models with
Transformers" (2023), whose parameter names ``ditlab.models.dit.DiT`` keeps, and diffusers' port of
that network (``DiTTransformer2DModel``, weight mapping as in diffusers' ``convert_dit_to_diffusers``
script). The port differs from the public DiT in three ways that this module reconciles:

- the timestep frequencies are divided by ``half - 1`` (``Timesteps(downscale_freq_shift=1)``, hard
  coded) where DiT divides by ``half``; our DiT has ``freq_shift`` for that, and :func:`to_diffusers`
  sets the attribute on every block for a DiT with ``freq_shift=0``;
- the LayerNorm before the MLP uses ``norm_eps`` (1e-5 by default) where DiT uses 1e-6; our DiT has
  ``mlp_norm_eps`` and the diffusers config carries it;
- the timestep/label embedders are copied into every block (the head uses block 0's copy), and the
  position embedding is a non-persistent buffer.

``save_pretrained`` keeps only the diffusers config, so the exact settings are also written to a
private config entry (``_ditlab``); :func:`restore_exact` (or :func:`load_diffusers`) re-applies them
after ``from_pretrained``. Without it a freq_shift=0 DiT loaded by plain diffusers is only close (max
|diff| 0.08 on outputs of std 0.9 for the trained digits DiT of ``configs/dit.yaml``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ditlab.models.config import SIZES, DiTConfig
from ditlab.models.dit import DiT, sincos_2d
from ditlab.models.loading import load_matching, network_from_checkpoint

DOWNLOAD_HINT = ("on a machine with network download DiT-XL-2-256x256.pt (or DiT-XL-2-512x512.pt) from "
                 "https://dl.fbaipublicfiles.com/DiT/models/, copy it here and pass its path")  # fmt: skip
EXACT_KEY = "_ditlab"  # private diffusers config entry: settings diffusers' config cannot express


# ----------------------------------------------------------------------------------- public DiT checkpoints
def read_state_dict(path: str | Path) -> dict:
    """A ``.pt``/``.pth``/``.ckpt`` (pickled) or ``.safetensors`` file, with one-line errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"DiT checkpoint {path} does not exist; {DOWNLOAD_HINT}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        # public training checkpoints carry their argparse Namespace next to the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        raise ValueError(f"DiT checkpoint {path} is truncated or corrupt and cannot be read "
                         f"({type(error).__name__}); {DOWNLOAD_HINT}") from None  # fmt: skip


def unwrap_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The weights inside a public DiT file: ``ema`` before ``model``, a raw state dict as is."""
    for key in ("ema", "model"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    weights = {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if "x_embedder.proj.weight" not in weights:
        sample = sorted(checkpoint)[:4]
        raise ValueError(f"not a DiT state dict: no 'x_embedder.proj.weight' among its keys (first keys: {sample}); "
                         "expected a facebookresearch/DiT checkpoint or its 'ema'/'model' entry")  # fmt: skip
    return weights


def preset_heads(hidden_size: int) -> int | None:
    """Heads of the paper preset with this width (S 384: 6, B 768: 12, L 1024: 16, XL 1152: 16)."""
    return next((p["num_heads"] for p in SIZES.values() if p["hidden_size"] == hidden_size), None)


def infer_config(weights: dict[str, torch.Tensor], **overrides) -> dict:
    """DiT constructor arguments read off the tensors; ``overrides`` win (``num_heads`` is not in them)."""
    kernel = weights["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = kernel.shape[0], kernel.shape[1], kernel.shape[-1]
    depth = 1 + max((int(k.split(".")[1]) for k in weights if k.startswith("blocks.")), default=-1)
    config: dict = {"hidden_size": hidden, "in_channels": in_channels, "patch_size": patch, "depth": depth}
    if "pos_embed" in weights:
        grid = math.isqrt(weights["pos_embed"].shape[1])
        if grid * grid != weights["pos_embed"].shape[1]:
            raise ValueError(f"pos_embed has {weights['pos_embed'].shape[1]} tokens, not a square grid; "
                             "only square DiT inputs are supported")  # fmt: skip
        config["input_size"] = grid * patch
    elif "input_size" not in overrides:
        raise ValueError("this DiT state dict has no pos_embed, so its input size is unknown; "
                         "pass input_size=<image or latent side> (32 for DiT-XL-2-256)")  # fmt: skip
    out_channels = weights["final_layer.linear.weight"].shape[0] // patch**2
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"final layer gives {out_channels} channels for {in_channels} input channels; "
                         "a DiT outputs C (epsilon/velocity) or 2C (learned sigma)")  # fmt: skip
    config["learn_sigma"] = out_channels == 2 * in_channels
    rows = weights["y_embedder.embedding_table.weight"].shape[0]
    if "num_classes" in overrides:
        config["class_dropout_prob"] = 0.1 if rows == overrides["num_classes"] + 1 else 0.0
    elif overrides.get("class_dropout_prob", 0.1) == 0:
        config["num_classes"] = rows
    else:  # the public models: a null-class row after the classes
        config.update(num_classes=rows - 1, class_dropout_prob=0.1)
    config.update(infer_widths(weights, hidden, depth, overrides))
    return {**config, **overrides}


def infer_widths(weights: dict[str, torch.Tensor], hidden: int, depth: int, overrides: dict) -> dict:
    """``num_heads``, ``head_dim`` and ``mlp_hidden`` from the block tensors, for full and width-pruned
    DiTs (pruning drops whole heads, so an unknown head count comes from the preset's head size)."""
    other = sorted({k.split(".mlp.")[1] for k in weights if k.startswith("blocks.") and ".mlp." in k} - {
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"})  # fmt: skip
    if other:  # e.g. a mixture of experts: its options are in the config a bare state dict does not carry
        raise ValueError(f"these weights hold another MLP kind than DiT's dense one (mlp.{other[0]}, ...); a bare "
                         "state dict cannot say how to build it: load the ditlab .ckpt, or a `ditlab convert` "
                         "export with its .json")  # fmt: skip
    widths = {(weights[f"blocks.{i}.attn.qkv.weight"].shape[0] // 3, weights[f"blocks.{i}.mlp.fc1.weight"].shape[0])
              for i in range(depth)}  # fmt: skip
    if len(widths) > 1:
        raise ValueError(
            f"blocks have different (attention, MLP) widths {sorted(widths)}; a DiT has one of each"
        )
    attention_width, mlp_hidden = widths.pop() if widths else (hidden, 4 * hidden)
    heads, head_dim = overrides.get("num_heads"), overrides.get("head_dim")
    if heads is None:
        preset = preset_heads(hidden)
        if head_dim is None and preset is None:
            raise ValueError(f"hidden size {hidden} matches no DiT preset {sorted(p['hidden_size'] for p in SIZES.values())}, "
                             "so the head count is unknown; pass num_heads=...")  # fmt: skip
        head_dim = head_dim or hidden // preset
        heads = attention_width // head_dim
    head_dim = head_dim or attention_width // heads
    if heads * head_dim != attention_width:
        raise ValueError(f"attention width {attention_width} is not num_heads={heads} x head_dim={head_dim}; "
                         "pass num_heads (and head_dim) that multiply to it")  # fmt: skip
    return {"num_heads": heads, "head_dim": head_dim, "mlp_ratio": 4.0, "mlp_hidden": mlp_hidden}


def load_dit_checkpoint(path_or_state_dict: str | Path | dict, convention: str | None = None, **overrides) -> DiT:
    """A DiT for a facebookresearch/DiT checkpoint (DiT-XL-2-256x256.pt, a training ``{"ema", "model"}``
    file, or a state dict), its architecture inferred from the tensors; strict: every key must fit.

    ``convention`` is the file's time convention: ``"ditlab"`` (DiT's DDPM steps, or flow time with t = 1 noise as
    REPA and ditlab) or ``"sit"`` (willisma/SiT: t = 0 noise, velocity = data - noise), which is converted on
    loading (:func:`load_sit_checkpoint`). None reads it off a SiT training file's ``args``; a bare state dict
    whose file name says SiT must name it. ``overrides`` set what the tensors cannot tell (``num_heads``
    off-preset, ``freq_shift``, ...). A ditlab Lightning checkpoint is accepted too (its EMA network).
    """
    checkpoint = path_or_state_dict
    if not isinstance(checkpoint, dict):
        checkpoint = read_state_dict(checkpoint)
    if "ditlab" in checkpoint and "state_dict" in checkpoint:
        return network_from_checkpoint(checkpoint)
    name = Path(path_or_state_dict).name if not isinstance(path_or_state_dict, dict) else None
    convention = file_convention(checkpoint, name, convention)
    weights = unwrap_state_dict(checkpoint)
    dit = DiT(DiTConfig(**infer_config(weights, **overrides)))
    if "pos_embed" not in weights:  # a fixed function of the grid: take the freshly built one
        weights = {**weights, "pos_embed": dit.pos_embed.detach().clone()}
    load_matching(dit, weights, "SiT checkpoint" if convention == "sit" else "DiT checkpoint")
    if convention == "sit":
        flip_time_convention(dit)
    return dit.eval()


# ----------------------------------------------------------------------------------- public SiT checkpoints
CONVENTIONS = ("ditlab", "sit")
SIT_PATHS = ("Linear", "GVP", "VP")  # willisma/SiT's --path-type choices (REPA writes lowercase names)


def file_convention(checkpoint: dict, name: str | None, convention: str | None) -> str:
    """The time convention of a public file: ``convention`` if given (checked against what the file says), else
    from a SiT training file's ``args``; a bare state dict is DiT's unless its file name says SiT (then: ask)."""
    if convention is not None and convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; choices: {list(CONVENTIONS)} (sit: willisma/SiT files)")
    args = checkpoint.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    declared = "sit" if args.get("path_type") in SIT_PATHS else "ditlab" if args else None
    if declared == "sit":
        if args["path_type"] == "VP" or args.get("prediction", "velocity") != "velocity":
            raise ValueError(f"this SiT checkpoint has path {args['path_type']!r} and prediction "
                             f"{args.get('prediction')!r}; ditlab samples linear or GVP velocity models only")  # fmt: skip
        if convention == "ditlab":
            raise ValueError(f"this file is a willisma/SiT checkpoint (args.path_type={args['path_type']!r}), whose time "
                             "runs the other way; load it with convention='sit' (converted) or without a convention")  # fmt: skip
    if convention is not None:
        return convention
    if declared is None and name is not None and re.search(r"(^|[^a-z])sit([^a-z]|$)", name.lower()):
        raise ValueError(f"{name} looks like a SiT file, but a bare state dict does not say its time convention: pass "
                         "convention='sit' (willisma/SiT: t = 0 noise, converted) or convention='ditlab' "
                         "(t = 1 noise: REPA, ditlab)")  # fmt: skip
    return declared or "ditlab"


def flip_time_convention(dit: DiT) -> DiT:
    """Convert ``dit`` in place between SiT's convention (t = 0 noise, velocity = data - noise) and ditlab's
    (t = 1 noise, velocity = noise - data): the converted network given ``t`` computes what the original computes
    at ``1 - t``, with its velocity channels negated. The map is its own inverse, so it also writes SiT files.

    Both changes are exact rewrites of weights. Velocity: the rows of the output projection that unpatchify to the
    first ``in_channels`` channels change sign (a learned-sigma half, unused by SiT, is left alone). Time: the
    sinusoidal features satisfy ``cos((1 - t) f) = cos f cos(t f) + sin f sin(t f)`` and
    ``sin((1 - t) f) = sin f cos(t f) - cos f sin(t f)``, a fixed linear map of the features at ``t``, folded into
    the first layer of the timestep MLP. The network must be fed ``t`` in [0, 1] as SiT feeds it (``t_scale: 1``).
    """
    embedder = dit.t_embedder
    half = embedder.frequency_size // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32)  # the embedder's own frequencies
    freqs = torch.exp(exponent / (half - embedder.freq_shift)).double()
    cos, sin = torch.cos(freqs), torch.sin(freqs)
    with torch.no_grad():
        first = embedder.mlp[0].weight
        weight = first.double()
        on_cos, on_sin = weight[:, :half].clone(), weight[:, half : 2 * half].clone()
        weight[:, :half] = on_cos * cos + on_sin * sin
        weight[:, half : 2 * half] = on_cos * sin - on_sin * cos
        first.copy_(weight.to(first.dtype))
        head = dit.final_layer.linear
        rows = torch.arange(head.out_features) % dit.out_channels < dit.in_channels  # (p, q, channel) order
        head.weight[rows] *= -1
        head.bias[rows] *= -1
    return dit


def load_sit_checkpoint(path_or_state_dict: str | Path | dict, **overrides) -> DiT:
    """A willisma/SiT checkpoint (``SiT-XL-2-256x256.pt``, a training file, or a state dict; Ma et al., "SiT:
    Exploring Flow and Diffusion-based Generative Models with Scalable Interpolant Transformers", 2024) as a
    ditlab network: :func:`flip_time_convention` turns SiT's t = 0 noise and data - noise velocity into ditlab's
    t = 1 noise, so it samples with ``FlowMatching(path=..., t_scale=1.0)`` like any ditlab flow network."""
    return load_dit_checkpoint(path_or_state_dict, convention="sit", **overrides)


def to_sit_state_dict(dit: DiT) -> dict[str, torch.Tensor]:
    """``dit``'s weights in SiT's time convention (a copy), loadable by willisma/SiT's ``models.py``."""
    converted = flip_time_convention(copy.deepcopy(dit))
    return {k: v.detach().cpu() for k, v in converted.state_dict().items()}


def save_sit_checkpoint(dit: DiT, path: str | Path) -> Path:
    """Write ``dit`` as a public SiT file (a bare state dict in SiT's convention, like ``SiT-XL-2-256x256.pt``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(to_sit_state_dict(dit), path)
    return path


# ----------------------------------------------------------------------------------- safetensors exports
def save_safetensors(dit: DiT, path: str | Path, metadata: dict | None = None) -> Path:
    """``path`` (``.safetensors``) with the weights and ``path.json`` with ``dit_config`` (+ ``metadata``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in dit.state_dict().items()}, path)
    path.with_suffix(".json").write_text(json.dumps({"dit_config": dit.config.to_record(), **(metadata or {})}, indent=2))
    return path


def load_safetensors(path: str | Path) -> DiT:
    """Rebuild a DiT written by :func:`save_safetensors` (or ``ditlab convert``): weights + JSON config."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "dit.safetensors"
    config_path = path.with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; export one with `ditlab convert --ckpt RUN.ckpt --out DIR`"
        )
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} (the DiT config of {path.name}) is missing; for a bare state dict "
                                "use load_dit_checkpoint, which infers the architecture")  # fmt: skip
    from safetensors.torch import load_file

    dit = DiT(DiTConfig.from_dict(DiTConfig.upgrade_record(json.loads(config_path.read_text())["dit_config"])))
    load_matching(dit, load_file(path), str(path))
    return dit.eval()


# ----------------------------------------------------------------------------------- diffusers
def _block_map(index: int) -> dict[str, str]:
    """Our block-``index`` parameter prefixes -> diffusers' (the qkv split is handled separately)."""
    ours, theirs = f"blocks.{index}.", f"transformer_blocks.{index}."
    return {ours + "attn.proj": theirs + "attn1.to_out.0", ours + "mlp.fc1": theirs + "ff.net.0.proj",
            ours + "mlp.fc2": theirs + "ff.net.2", ours + "adaLN_modulation.1": theirs + "norm1.linear"}  # fmt: skip


EMBEDDER_MAP = {"t_embedder.mlp.0": "timestep_embedder.linear_1", "t_embedder.mlp.2": "timestep_embedder.linear_2",
                "y_embedder.embedding_table": "class_embedder.embedding_table"}  # fmt: skip
HEAD_MAP = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
            "final_layer.linear": "proj_out_2"}  # fmt: skip


def check_exportable(dit: DiT) -> None:
    """Refuse DiTs that ``DiTTransformer2DModel`` cannot express, naming what differs."""
    hidden = dit.pos_embed.shape[-1]
    config = dit.config
    if (config.attention, config.mlp) != ("full", "dense"):
        raise ValueError(f"this DiT has {config.attention!r} attention and a {config.mlp!r} MLP; diffusers' "
                         "DiTTransformer2DModel has full attention and a dense MLP only, so export it with "
                         "`ditlab convert --format safetensors`")  # fmt: skip
    if config.block != "dit":
        raise ValueError(f"this DiT has {config.block!r} blocks; diffusers' DiTTransformer2DModel has sequential DiT "
                         "blocks only, so export it with `ditlab convert --format safetensors`")  # fmt: skip
    if config.qk_norm:
        raise ValueError("this DiT normalises queries and keys (qk_norm), which diffusers' DiTTransformer2DModel "
                         "does not, so export it with `ditlab convert --format safetensors`")  # fmt: skip
    if not dit.depth:
        raise ValueError("a DiT with no blocks cannot go to diffusers, whose head reads block 0's embedder")
    for index, block in enumerate(dit.blocks):
        attention_width = block.attn.qkv.weight.shape[0] // 3
        if attention_width != hidden or block.attn.proj.weight.shape[1] != hidden:
            raise ValueError(f"block {index} attends at width {attention_width} != hidden size {hidden} (width-pruned); "
                             "diffusers' DiTTransformer2DModel needs heads x head_dim == hidden size, "
                             "so export it with `ditlab convert --format safetensors`")  # fmt: skip
        if block.mlp.fc1.weight.shape[0] != 4 * hidden:
            raise ValueError(f"block {index} has MLP width {block.mlp.fc1.weight.shape[0]} != 4 x hidden size {hidden}; "
                             "diffusers' DiTTransformer2DModel fixes mlp_ratio=4, so export with --format safetensors")  # fmt: skip


def to_diffusers(dit: DiT):
    """A ``diffusers.DiTTransformer2DModel`` computing what ``dit`` computes (same float32 outputs up to
    ~1e-6 at most: diffusers projects q, k and v separately where DiT fuses them)."""
    from diffusers import DiTTransformer2DModel

    check_exportable(dit)
    hidden = dit.pos_embed.shape[-1]
    heads = dit.blocks[0].attn.num_heads
    freq_shift, dropout = float(dit.t_embedder.freq_shift), float(dit.y_embedder.dropout_prob)
    model = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=dit.in_channels,
        out_channels=dit.out_channels, num_layers=dit.depth, sample_size=dit.input_size, patch_size=dit.patch_size,
        num_embeds_ada_norm=dit.num_classes, norm_eps=dit.blocks[0].norm2.eps,
    )  # fmt: skip
    model.register_to_config(**{EXACT_KEY: {"freq_shift": freq_shift, "class_dropout_prob": dropout}})
    ours = dit.state_dict()
    table = ours["y_embedder.embedding_table.weight"]
    if table.shape[0] == dit.num_classes:  # trained without label dropout: add the null row diffusers expects
        table = torch.cat([table, table.new_zeros(1, hidden)])
    theirs: dict[str, torch.Tensor] = {}
    for name, target in HEAD_MAP.items():
        for kind in ("weight", "bias"):
            theirs[f"{target}.{kind}"] = ours[f"{name}.{kind}"]
    for index in range(dit.depth):
        prefix = f"transformer_blocks.{index}."
        for name, target in _block_map(index).items():
            for kind in ("weight", "bias"):
                theirs[f"{target}.{kind}"] = ours[f"{name}.{kind}"]
        for kind in ("weight", "bias"):
            for letter, chunk in zip("qkv", ours[f"blocks.{index}.attn.qkv.{kind}"].chunk(3, dim=0)):
                theirs[f"{prefix}attn1.to_{letter}.{kind}"] = chunk
        for name, target in EMBEDDER_MAP.items():
            for kind in ("weight", "bias") if name.startswith("t_") else ("weight",):
                value = table if name.startswith("y_") else ours[f"{name}.{kind}"]
                theirs[f"{prefix}norm1.emb.{target}.{kind}"] = value
    load_matching(model, {k: v.clone() for k, v in theirs.items()}, "converted DiT")
    model.pos_embed.pos_embed.copy_(dit.pos_embed.detach())
    if dit.pos_embed.dtype != torch.float32:
        model = model.to(dit.pos_embed.dtype)
    return restore_exact(model, pos_embed=False).eval()


def restore_exact(model, pos_embed: bool = True):
    """Re-apply ditlab's exact settings (timestep frequency shift, DiT's position embedding) to a
    ``DiTTransformer2DModel`` loaded with ``from_pretrained``; a model without them is returned as is."""
    settings = model.config.get(EXACT_KEY) if hasattr(model.config, "get") else None
    if not settings:
        return model
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = settings["freq_shift"]
    if pos_embed:
        grid = model.config.sample_size // model.config.patch_size
        exact = torch.from_numpy(sincos_2d(model.pos_embed.pos_embed.shape[-1], grid)).float().unsqueeze(0)
        model.pos_embed.pos_embed.copy_(exact.to(model.pos_embed.pos_embed))
    return model


def load_diffusers(folder: str | Path):
    """``DiTTransformer2DModel.from_pretrained(folder)`` (a model or pipeline folder) with :func:`restore_exact`."""
    from diffusers import DiTTransformer2DModel

    folder = Path(folder).expanduser()
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers model folder (no config.json); "
                                "export one with `ditlab convert --format diffusers`")  # fmt: skip
    return restore_exact(DiTTransformer2DModel.from_pretrained(folder, local_files_only=True)).eval()


def _embedder_settings(model) -> tuple[float, float]:
    """(freq_shift, mlp_norm_eps) shared by all blocks; refuses blocks whose embedder copies differ."""
    blocks = model.transformer_blocks
    reference = blocks[0].norm1.emb.state_dict()
    for index, block in enumerate(blocks[1:], start=1):
        for name, value in block.norm1.emb.state_dict().items():
            if not torch.equal(value, reference[name]):
                raise ValueError(f"transformer_blocks.{index}.norm1.emb.{name} differs from block 0's copy; "
                                 "DiT shares one timestep/label embedder, so this model has no DiT equivalent")  # fmt: skip
    projections = {(b.norm1.emb.time_proj.downscale_freq_shift, b.norm1.emb.time_proj.flip_sin_to_cos,
                    b.norm1.emb.time_proj.scale) for b in blocks}  # fmt: skip
    eps = {b.norm3.eps for b in blocks}
    if len(projections) > 1 or len(eps) > 1:
        raise ValueError("the blocks' timestep projections or MLP LayerNorm eps differ; DiT shares them")
    shift, flip, scale = projections.pop()
    if not flip or scale != 1:
        raise ValueError(f"timestep projection with flip_sin_to_cos={flip}, scale={scale} has no DiT equivalent "
                         "(DiT uses [cos, sin] of the unscaled timestep)")  # fmt: skip
    if any(b.norm1.norm.eps != 1e-6 for b in blocks) or model.norm_out.eps != 1e-6:
        raise ValueError("the attention/output LayerNorm eps is not 1e-6 as in DiT")
    return float(shift), float(eps.pop())


def from_diffusers(model, **overrides) -> DiT:
    """A ``ditlab`` DiT computing exactly what a diffusers ``DiTTransformer2DModel`` computes (it takes
    the port's ``freq_shift`` and ``mlp_norm_eps``); ``overrides`` e.g. ``class_dropout_prob``."""
    config = model.config
    expected = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
                "norm_elementwise_affine": False}  # fmt: skip
    bad = {k: config.get(k) for k, v in expected.items() if config.get(k) != v}
    if bad or not model.transformer_blocks:
        raise ValueError(f"this DiTTransformer2DModel has {bad or 'no blocks'}; DiT needs {expected}")
    freq_shift, mlp_norm_eps = _embedder_settings(model)
    hidden, in_channels = model.inner_dim, config.in_channels
    if model.out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"out_channels={model.out_channels} is neither in_channels nor twice it")
    embedder = model.transformer_blocks[0].norm1.emb
    exact = config.get(EXACT_KEY) or {}
    dropout = float(exact.get("class_dropout_prob", embedder.class_embedder.dropout_prob))
    kwargs = {"input_size": config.sample_size, "patch_size": config.patch_size, "in_channels": in_channels,
              "hidden_size": hidden, "depth": len(model.transformer_blocks), "num_heads": config.num_attention_heads,
              "class_dropout_prob": dropout, "num_classes": embedder.class_embedder.num_classes,
              "learn_sigma": model.out_channels == 2 * in_channels, "freq_shift": freq_shift,
              "mlp_norm_eps": mlp_norm_eps, **overrides}  # fmt: skip
    dit = DiT(DiTConfig(**kwargs))
    theirs = model.state_dict()
    ours: dict[str, torch.Tensor] = {"pos_embed": model.pos_embed.pos_embed.detach().clone()}
    for name, source in HEAD_MAP.items():
        for kind in ("weight", "bias"):
            ours[f"{name}.{kind}"] = theirs[f"{source}.{kind}"]
    for name, source in EMBEDDER_MAP.items():
        for kind in ("weight", "bias") if name.startswith("t_") else ("weight",):
            ours[f"{name}.{kind}"] = theirs[f"transformer_blocks.0.norm1.emb.{source}.{kind}"]
    rows = dit.y_embedder.embedding_table.weight.shape[0]
    ours["y_embedder.embedding_table.weight"] = ours["y_embedder.embedding_table.weight"][:rows]
    for index in range(len(model.transformer_blocks)):
        prefix = f"transformer_blocks.{index}.attn1.to_"
        for name, source in _block_map(index).items():
            for kind in ("weight", "bias"):
                ours[f"{name}.{kind}"] = theirs[f"{source}.{kind}"]
        for kind in ("weight", "bias"):
            projections = [theirs[f"{prefix}{letter}.{kind}"] for letter in "qkv"]
            ours[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(projections)
    load_matching(dit, {k: v.clone() for k, v in ours.items()}, "DiTTransformer2DModel")
    return dit.eval()
