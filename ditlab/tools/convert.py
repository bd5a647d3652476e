"""``ditlab convert --ckpt RUN.ckpt --out DIR [--format safetensors|diffusers] [--no-ema]``.

Exports a run's sampled (EMA) network without Lightning: ``safetensors`` writes ``DIR/dit.safetensors``
and ``DIR/dit.json`` (DiT config, objective, sampling settings; ``ditlab.models.interop.load_safetensors``
rebuilds it); ``diffusers`` writes a pipeline folder that ``diffusers.DiffusionPipeline.from_pretrained`` loads and
calls with no ditlab installed: the transformer, a scheduler configured as the run samples, the run's VAE when it
trained on latents, and ``pipeline.py`` (``DitlabDiTPipeline``: the run's null class, no VAE in pixel space).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ditlab.checkpoint import known_fields, network_from_checkpoint, read_checkpoint
from ditlab.diffusion.config import ObjectiveConfig
from ditlab.diffusion.grids import DIFFUSERS_SPACINGS
from ditlab.models.dit import sincos_2d
from ditlab.models.interop import save_safetensors, to_diffusers

FORMATS = ("safetensors", "diffusers")


def pipeline_scheduler(objective: dict, sampling: dict):
    """The diffusers scheduler the pipeline steps with, configured as the run samples (its sampler, and its time grid
    where it is one of diffusers' spacings), and what it cannot reproduce (None when it reproduces the run). The
    variance is fixed: the pipeline drops a learned-sigma network's variance channels, as ``DiTPipeline`` does."""
    if objective["kind"] != "gaussian":
        raise ValueError("a diffusers export (--format diffusers) needs a DDPM-trained (objective.kind gaussian) run: "
                         "DiTPipeline feeds integer DDPM timesteps and has no flow sampler; use --format safetensors")  # fmt: skip
    built = ObjectiveConfig(**known_fields(ObjectiveConfig, objective)).build(learn_sigma=False)
    sampler, grid = sampling.get("sampler") or "ddpm", sampling.get("time_grid")
    spacing = grid if grid in DIFFUSERS_SPACINGS else None
    scheduler = built.scheduler(sampler, spacing=spacing, alpha_to_one=bool(sampling.get("ddim_alpha_to_one")))
    gaps = []
    if grid is not None and spacing is None:
        gaps.append(f"the run's time grid {grid!r} (the pipeline uses diffusers' {scheduler.config.timestep_spacing!r})")
    if sampler == "ddpm":
        gaps.append("DDPM's learned variance (the pipeline's is fixed) and its per-image ancestral noise")
    return scheduler, "; ".join(gaps) or None


def pipeline_readme(meta: dict, gaps: str | None, classes: int) -> str:
    """The folder's README: how a diffusers user loads and calls it, and what it needs."""
    sampling = meta["sampling"]
    needs = ("`vae/` is the run's VAE; the pipeline decodes with it." if meta.get("vae") else
             "This is a **pixel-space** run: there is no VAE. `pipeline.py` (`DitlabDiTPipeline`, diffusers code only) "
             "returns the sampled pixels themselves; diffusers' stock `DiTPipeline` cannot load this folder (it "
             "requires a VAE).")  # fmt: skip
    same = ("The pipeline reproduces `ditlab sample` on the same noise up to float rounding." if gaps is None else
            f"Not reproduced: {gaps}; DDIM on diffusers' spacings reproduces `ditlab sample` on the same noise.")  # fmt: skip
    return f"""# A ditlab run as a diffusers pipeline

Written by `ditlab convert --format diffusers` from `{meta.get('source', 'a ditlab checkpoint')}`.

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("THIS_FOLDER", trust_remote_code=True)   # runs pipeline.py: DitlabDiTPipeline
generators = [torch.Generator().manual_seed(i) for i in range(8)]   # image i from seed i, as `ditlab sample`
images = pipe(class_labels=[i % {classes} for i in range(8)], guidance_scale={sampling.get('cfg_scale')},
              num_inference_steps={sampling.get('steps')}, generator=generators).images
```

- {needs}
- The run samples with sampler `{sampling.get('sampler') or 'ddpm'}`, {sampling.get('steps')} steps, guidance
  {sampling.get('cfg_scale')}; `scheduler/` is configured so. Classes 0..{classes - 1}; the guidance null class is
  {classes} (`DitlabDiTPipeline` reads it from the transformer; `DiTPipeline` would use 1000).
- {same}
"""


def export_diffusers(network, meta: dict, out: Path) -> str | None:
    """A pipeline folder: ``transformer/``, ``scheduler/`` (configured as the run samples), ``vae/`` for a latent
    run, ``pipeline.py`` (``DitlabDiTPipeline``), ``model_index.json`` naming it, and a README; returns what the
    pipeline does not reproduce (None: nothing)."""
    import diffusers

    standard = torch.from_numpy(sincos_2d(network.pos_embed.shape[-1], network.x_embedder.grid_size)).float()
    if not torch.allclose(network.pos_embed.detach()[0], standard, atol=1e-6):
        raise ValueError("this network's pos_embed is not DiT's fixed sin-cos table, which diffusers regenerates "
                         "on load; export it with --format safetensors")  # fmt: skip
    scheduler, gaps = pipeline_scheduler(meta["objective"], meta["sampling"])
    to_diffusers(network).save_pretrained(out / "transformer")
    scheduler.save_pretrained(out / "scheduler")
    vae = ["diffusers", "AutoencoderKL"] if meta.get("vae") else [None, None]
    if meta.get("vae"):
        from ditlab.data.vae import load_vae

        model = load_vae(meta["vae"])
        model.register_to_config(scaling_factor=float(meta.get("latent_scale", model.config.scaling_factor)))
        model.save_pretrained(out / "vae")
    shutil.copyfile(Path(__file__).parents[1] / "models" / "diffusers_pipeline.py", out / "pipeline.py")
    index = {"_class_name": ["pipeline", "DitlabDiTPipeline"], "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", type(scheduler).__name__], "transformer": ["diffusers", "DiTTransformer2DModel"],
             "vae": vae}  # fmt: skip
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    (out / "README.md").write_text(pipeline_readme(meta, gaps, network.num_classes))
    return gaps


def weights_of(checkpoint: dict, ema: bool) -> str:
    """Which weights an export holds: ``ema`` when asked for and present, else ``network``."""
    has_ema = any(key.startswith("ema.") for key in checkpoint["state_dict"])
    return "ema" if has_ema and ema else "network"


def export_text_transformer(network, folder: Path, weights: str, source: str) -> int:
    """A text-conditioned run's transformer as the diffusers class its blocks are (PixArt, SD3, FLUX) in
    ``folder/transformer``, which ``<Class>.from_pretrained`` loads and ``ditlab.models.loading.load_network`` reads
    back exactly. Its text encoder is the run's (``condition_options.encoder``), not a diffusers component, so no
    pipeline is written."""
    from ditlab.models.diffusers_t2i import to_model

    model = to_model(network)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder / "transformer")
    encoder = network.config.condition_options.get("encoder")
    (folder / "ditlab.json").write_text(json.dumps({"weights": weights, "source": source, "text_encoder": encoder},
                                                   indent=2))  # fmt: skip
    print(f"wrote {folder / 'transformer'} ({type(model).__name__}, {weights} weights); its text encoder is the run's "
          f"{encoder!r}, which a diffusers pipeline does not hold: pass its features as prompt_embeds")  # fmt: skip
    return 0


def convert(ckpt: str, out: str, format: str = "safetensors", ema: bool = True) -> int:
    """Export a run's network without Lightning: safetensors + JSON, or a diffusers pipeline folder.

    ``safetensors`` writes ``OUT/dit.safetensors`` and ``OUT/dit.json`` (config, objective, sampling settings;
    ``ditlab.models.interop.load_safetensors`` rebuilds it); ``diffusers`` writes a folder that
    ``DiffusionPipeline.from_pretrained`` loads and calls (transformer, a scheduler configured as the run samples,
    the run's VAE for a latent run, ``pipeline.py``; its README says what a pixel-space run's pipeline needs).

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
    if format == "diffusers" and network.config.text_conditioned:
        return export_text_transformer(network, Path(out), weights_of(checkpoint, ema), str(ckpt))
    if format == "diffusers":  # refuse a flow run before writing anything
        pipeline_scheduler(meta["objective"], meta["sampling"])
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    weights = weights_of(checkpoint, ema)
    if format == "safetensors":
        extra = {key: meta.get(key) for key in ("objective", "sampling", "vae", "latent_scale")}
        extra.update(weights=weights, source=str(ckpt))
        path = save_safetensors(network, folder / "dit.safetensors", extra)
        print(f"wrote {path} and {path.with_suffix('.json').name} ({weights} weights, "
              f"{sum(p.numel() for p in network.parameters()):,} parameters)")  # fmt: skip
        return 0
    gaps = export_diffusers(network, {**meta, "source": str(ckpt)}, folder)
    (folder / "ditlab.json").write_text(json.dumps({"weights": weights, "source": str(ckpt)}, indent=2))
    needs = ("with the run's VAE" if meta.get("vae") else
             "pixel space, no VAE: its pipeline.py (DitlabDiTPipeline) returns the pixels; stock DiTPipeline cannot load it")
    print(f"wrote a diffusers pipeline {folder} ({weights} weights, {needs}); load it with "
          f"DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True) (it runs the folder's pipeline.py), "
          "see its README.md"
          + (f"; not reproduced: {gaps}" if gaps else ""))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """``ditlab convert ARGS`` (what ``ditlab.cli`` runs)."""
    from ditlab.tools.command import run_tool

    return run_tool("convert", list(argv or []))
