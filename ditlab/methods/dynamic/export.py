"""A trained dynamic network in its inference form, its measured FLOPs, and a checkpoint any ditlab tool reads.

:func:`export` returns an evaluation-mode copy whose trunk slices (only kept heads, channel groups, tokens and
samples are computed). For DyDiT the width masks depend on the timestep alone, so the copy also carries a
per-timestep table of them (``trunk_options.table_steps``): sampling reads each step's pattern instead of
running the width routers, and the sliced weights of a pattern are cut once. :func:`save_checkpoint` writes the
result as a plain ditlab checkpoint (architecture in ``dit_config``, weights under ``network.``), so
``load_network``, ``ditlab sample``, ``ditlab eval`` and the ``Evaluation`` callback run the exported form.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ditlab.atomic import save_torch
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.dynamic.dydit import DyDiTTrunk
from ditlab.methods.dynamic.routing import DynamicTrunk
from ditlab.models.budget import flops_per_image
from ditlab.models.dit import DiT
from ditlab.models.loading import network_checkpoint


def dynamic_trunk(network: DiT) -> DynamicTrunk:
    """The dynamic trunk of ``network``; a plain DiT is refused in one line."""
    trunk = getattr(network, "trunk", None)
    if not isinstance(trunk, DynamicTrunk):
        raise ValueError(f"this network has the {network.config.trunk!r} trunk, not a dynamic one (dydit, elastic, "
                         "chunking); build it with DiTConfig(trunk=...) or train it with DynamicModule")  # fmt: skip
    return trunk


def plain_flops(network: DiT) -> int:
    """FLOPs per image of the plain DiT under the routers (what every ratio is taken against)."""
    trunk = dynamic_trunk(network)
    return flops_per_image(network) - 2 * trunk.macs(network.x_embedder.num_patches)


def dynamic_flops(network: DiT) -> torch.Tensor:
    """``(B,)`` FLOPs per image of the last forward, routers included: the plain network's FLOPs, minus what the
    routers switched off, plus the routers themselves (all from the components' own ``macs``)."""
    trunk = dynamic_trunk(network)
    if trunk.last is None:
        raise ValueError("run the network once before asking for its dynamic FLOPs")
    return flops_per_image(network) - 2 * trunk.last.saved_macs.detach().double()


@torch.no_grad()
def export(network: DiT, num_timesteps: int = 1000) -> DiT:
    """The inference form of a dynamic network: an evaluation-mode, sliced copy (DyDiT: with its per-timestep
    width table for the integer steps ``0 .. num_timesteps - 1``)."""
    trunk = dynamic_trunk(network)
    if isinstance(trunk, DyDiTTrunk):
        options = {**network.config.trunk_options, "table_steps": num_timesteps}
        exported = DiT(network.config.replace(trunk_options=options)).to(next(network.parameters()).device)
        weights = {k: v for k, v in network.state_dict().items() if k != "trunk.width_table"}
        exported.load_state_dict(weights, strict=False)
        steps = torch.arange(num_timesteps, device=exported.pos_embed.device)
        exported.trunk.width_table.copy_(trunk.timestep_table(network, steps))
    else:
        exported = copy.deepcopy(network)
    exported.trunk.set_form("sliced")
    exported.trunk.dense = False
    return exported.requires_grad_(False).eval()


def save_checkpoint(network: DiT, path: str | Path, objective: ObjectiveConfig, sampling: SamplingConfig) -> Path:
    """Write ``network`` as a ditlab checkpoint that ``load_network`` rebuilds from its config alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch(network_checkpoint(network, objective, sampling), path)
    return path


def export_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Read a dynamic training checkpoint (its EMA weights), export it and write the inference form to ``target``:
    ``ditlab export --ckpt RUN.ckpt --out EXPORTED.ckpt``."""
    from ditlab.checkpoint import bundle_from_checkpoint, read_checkpoint, run_settings

    bundle = bundle_from_checkpoint(source)
    objective, sampling = run_settings(read_checkpoint(source)["ditlab"])
    steps = getattr(bundle.objective, "num_timesteps", 1000)
    return save_checkpoint(export(bundle.network, steps), target, objective, sampling)
