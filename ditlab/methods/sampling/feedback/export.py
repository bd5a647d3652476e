"""An ILF run as one self-contained checkpoint (``ditlab export --ckpt ILF.ckpt --out ILF_FULL.ckpt``).

A training checkpoint holds the feedback block alone and names its teacher's file; the export puts the teacher's
weights beside the block, so ``ditlab sample``/``eval --ckpt ILF_FULL.ckpt`` run on a machine without the teacher.
"""

from __future__ import annotations

from pathlib import Path

from ditlab.atomic import save_torch
from ditlab.checkpoint import read_checkpoint, through_teacher


def export_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Write the run at ``source`` with its teacher's weights inside to ``target``; returns ``target``."""
    checkpoint = read_checkpoint(source)
    if "feedback" not in checkpoint:
        raise ValueError(f"{source} holds no feedback block; pass a checkpoint of a FeedbackModule (ILF) run")
    bundle = through_teacher(checkpoint, None, "")
    meta = {key: value for key, value in checkpoint["ditlab"].items() if key != "teacher"}
    meta.update(vae=bundle.vae, latent_scale=bundle.latent_scale)
    state = {f"network.{key}": value for key, value in bundle.network.state_dict().items()}
    state.update({key: value for key, value in checkpoint["state_dict"].items() if key.startswith("feedback.")})
    saved = {key: value for key, value in checkpoint["feedback"].items() if key not in ("trajectory", "training_draws")}
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return save_torch({"ditlab": meta, "feedback": {**saved, "trajectory": None, "training_draws": None},
                       "state_dict": state}, target)  # fmt: skip
