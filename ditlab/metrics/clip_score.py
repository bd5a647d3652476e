"""CLIP score (Hessel et al., 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning") on
embeddings of any CLIP (Radford et al., 2021), as a torchmetrics ``Metric`` whose state is two sums.

Definition (torchmetrics' documented one, with Hessel et al.'s weight of 100): per image-caption pair
``100 * max(cos(E_image, E_caption), 0)``, averaged over pairs. (torchmetrics' ``CLIPScore`` clamps the mean
rather than each pair; the two agree whenever no pair has a negative cosine.) The state is the sum of pair
scores and the pair count, both reduced by summation, so scores sharded over DDP processes add up to exactly
the single-process number, whatever the shard sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def pair_scores(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """``100 * max(cos, 0)`` of each row pair, ``(N,)`` float64 (embeddings need not be normalised)."""
    if image_embeddings.dim() != 2 or image_embeddings.shape != text_embeddings.shape:
        raise ValueError(f"CLIP score needs image and text embeddings of one shape (N, E); got "
                         f"{tuple(image_embeddings.shape)} and {tuple(text_embeddings.shape)}")  # fmt: skip
    cosine = (F.normalize(image_embeddings.double(), dim=-1) * F.normalize(text_embeddings.double(), dim=-1)).sum(-1)
    return 100 * cosine.clamp_min(0)


class CLIPScore(Metric):
    """Mean CLIP score of ``update(image_embeddings (N, E), text_embeddings (N, E))`` pairs."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> None:
        scores = pair_scores(image_embeddings, text_embeddings)
        self.total += scores.sum().to(self.total.device)
        self.count += len(scores)

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("CLIP score of no pairs: call update(image_embeddings, text_embeddings) first")
        return (self.total / self.count).float()
