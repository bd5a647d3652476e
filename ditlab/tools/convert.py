"""``ditlab convert --ckpt RUN.ckpt --out DIR [--format safetensors|diffusers] [--no-ema]``.

Exports a run's sampled (EMA) network without Lightning: ``safetensors`` writes ``DIR/dit.safetensors``
and ``DIR/dit.json`` (DiT config, objective, sampling settings; ``ditlab.models.interop.load_safetensors``
rebuilds it); ``diffusers`` writes a ``DiTPipeline`` folder (transformer, scheduler matching the run's
sampler, and the run's VAE when it trained on latents) for the diffusers port of Peebles & Xie's DiT.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ditlab.checkpoint import network_from_checkpoint, read_checkpoint
from ditlab.diffusion.config import ObjectiveConfig
from ditlab.models.dit import sincos_2d
from ditlab.models.interop import save_safetensors, to_diffusers

FORMATS = ("safetensors", "diffusers")


def pipeline_scheduler(objective: dict, sampler: str | None):
    """The diffusers scheduler ``DiTPipeline`` should step with: the run's sampler, fixed variance
    (the pipeline drops a learned-sigma network's variance channels)."""
    if objective["kind"] != "gaussian":
        raise ValueError("a diffusers export (--format diffusers) needs a DDPM-trained (objective.kind gaussian) run: DiTPipeline "
                         "feeds integer DDPM timesteps and has no flow sampler; use --format safetensors")  # fmt: skip
    known = {k: v for k, v in objective.items() if k in ObjectiveConfig.__dataclass_fields__}
    objective = ObjectiveConfig(**known).build(learn_sigma=False)  # learn_sigma False: DDPM's fixed variance
    return objective.scheduler(sampler if sampler in objective.samplers else "ddpm")


def export_diffusers(network, meta: dict, out: Path) -> None:
    """A ``DiTPipeline`` folder; pixel-space runs get ``vae: null`` (pass ``vae=`` to ``from_pretrained``)."""
    from diffusers import DiTPipeline

    standard = torch.from_numpy(sincos_2d(network.pos_embed.shape[-1], network.x_embedder.grid_size)).float()
    if not torch.allclose(network.pos_embed.detach()[0], standard, atol=1e-6):
        raise ValueError("this network's pos_embed is not DiT's fixed sin-cos table, which diffusers regenerates "
                         "on load; export it with --format safetensors")  # fmt: skip
    transformer = to_diffusers(network)
    scheduler = pipeline_scheduler(meta["objective"], meta["sampling"].get("sampler"))
    vae = None
    if meta.get("vae"):
        from ditlab.data.vae import load_vae

        vae = load_vae(meta["vae"])
        vae.register_to_config(scaling_factor=float(meta.get("latent_scale", vae.config.scaling_factor)))
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(out)


def convert(ckpt: str, out: str, format: str = "safetensors", ema: bool = True) -> int:
    """Export a run's network without Lightning: safetensors + JSON, or a diffusers DiTPipeline folder.

    ``safetensors`` writes ``OUT/dit.safetensors`` and ``OUT/dit.json`` (config, objective, sampling settings;
    ``ditlab.models.interop.load_safetensors`` rebuilds it); ``diffusers`` writes a ``DiTPipeline`` folder
    (transformer, a scheduler matching the run's sampler, and the run's VAE when it trained on latents).

    Args:
        ckpt: a ditlab checkpoint (a .ckpt file or a sharded checkpoint folder).
        out: output folder.
        format: safetensors | diffusers.
        ema: export the EMA network; ``--no-ema`` exports the raw network.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r} (--format); choices: {list(FORMATS)}")
    checkpoint = read_checkpoint(ckpt)
    network = network_from_checkpoint(checkpoint, use_ema=ema)
    meta = checkpoint["ditlab"]
    if format == "diffusers":  # refuse a flow run before writing anything
        pipeline_scheduler(meta["objective"], meta["sampling"].get("sampler"))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    has_ema = any(key.startswith("ema.") for key in checkpoint["state_dict"])
    weights = "ema" if has_ema and ema else "network"
    if format == "safetensors":
        extra = {key: meta.get(key) for key in ("objective", "sampling", "vae", "latent_scale")}
        extra.update(weights=weights, source=str(ckpt))
        path = save_safetensors(network, folder / "dit.safetensors", extra)
        print(f"wrote {path} and {path.with_suffix('.json').name} ({weights} weights, "
              f"{sum(p.numel() for p in network.parameters()):,} parameters)")  # fmt: skip
        return 0
    export_diffusers(network, meta, folder)
    (folder / "ditlab.json").write_text(json.dumps({"weights": weights, "source": str(ckpt)}, indent=2))
    if network.num_classes != 1000:
        print(f"note: DiTPipeline hard-codes the null class to 1000; with this {network.num_classes}-class model "
              "call it with guidance_scale=1")  # fmt: skip
    print(f"wrote a DiTPipeline folder {folder} ({weights} weights{'' if meta.get('vae') else ', no VAE: pixel-space run'}); "
          "load it with ditlab.models.interop.load_diffusers for bit-exact timesteps")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """``ditlab convert ARGS`` (what ``ditlab.cli`` runs)."""
    from ditlab.tools.command import run_tool

    return run_tool("convert", list(argv or []))
