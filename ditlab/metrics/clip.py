"""CLIP score (Hessel et al., 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning"):
``100 * cos(image embedding, text embedding)``, through torchmetrics' ``CLIPScore``.

Class-conditional runs are scored against prompts built from class names ("a photo of the digit 3").
Weights come only from a local folder (a ``transformers`` CLIP checkpoint such as
``openai/clip-vit-large-patch14`` saved with ``save_pretrained`` or ``hf download --local-dir``), passed to
torchmetrics as a callable that returns ``(model, processor)``, so nothing is downloaded on a compute node.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

DIGITS_TEMPLATE = "a photo of the digit {}"
CLIP_MODEL = "openai/clip-vit-large-patch14"


def class_prompts(labels: torch.Tensor | Sequence[int], class_names: Sequence[str] | None = None,
                  template: str = DIGITS_TEMPLATE) -> list[str]:  # fmt: skip
    """One prompt per label: ``template`` filled with the class name (the label itself without names)."""
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    if class_names is not None:
        bad = [label for label in labels if not 0 <= label < len(class_names)]
        if bad:
            raise ValueError(f"labels {bad[:3]} have no class name; {len(class_names)} names were given")
        return [template.format(class_names[label]) for label in labels]
    return [template.format(label) for label in labels]


def clip_model_path(path: str | Path | None = None) -> Path:
    """The local CLIP folder: ``path``, else ``$DITLAB_CLIP_MODEL``; a one-line error when there is none."""
    path = path or os.environ.get("DITLAB_CLIP_MODEL")
    hint = (f"on a networked machine run `hf download {CLIP_MODEL} --local-dir DIR`, then pass DIR "
            "(or set DITLAB_CLIP_MODEL)")  # fmt: skip
    if path is None:
        raise FileNotFoundError(f"CLIP score needs local CLIP weights and none were given; {hint}")
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"CLIP weights not found at {path} (no config.json); {hint}")
    return path


def local_clip(path: str | Path | None = None):
    """A zero-argument callable returning ``(CLIPModel, CLIPProcessor)`` from a local folder, offline."""
    folder = clip_model_path(path)

    def load():
        try:
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as error:
            raise ModuleNotFoundError("CLIP score needs transformers: pip install transformers") from error
        return (CLIPModel.from_pretrained(folder, local_files_only=True),
                CLIPProcessor.from_pretrained(folder, local_files_only=True))  # fmt: skip

    return load


def clip_score(images: torch.Tensor, prompts: Sequence[str], model: str | Path | None = None,
               batch_size: int = 64) -> float:  # fmt: skip
    """Mean CLIP score of ``images: (N, C, H, W)`` in [-1, 1] against one prompt each."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
    loader = local_clip(model)
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=loader)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = ((chunk.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        metric.update(pixels, list(prompts[start : start + batch_size]))
    return float(metric.compute())
