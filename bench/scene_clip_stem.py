"""Can the scene CLIP's image tower learn digit identity at all? A supervised check of its stem.

The scene CLIP (``ditlab.metrics.scene_clip``) matches captions to images by colour, size and background but
reads digits at chance. This separates "the contrastive signal is too weak" from "the tower cannot learn digits at
this budget": it trains the image tower alone, with a linear head on its pooled embedding, on the plainest digit
task the scenes have -- which of the ten digits are present (multi-label, binary cross-entropy) -- with the scene
CLIP's own optimiser (one-cycle AdamW, its lr and weight decay) and budget, for each stem given:

- ``plain``: the default recipe (two stride-2 convolutions, no normalisation);
- ``deep``: four convolutions (a 13-pixel receptive field per token, a whole glyph);
- ``deep-norm``: four convolutions with GroupNorm after each but the last;
- ``batch-norm`` / ``deep-batch-norm``: two / four convolutions with BatchNorm after each but the last;
- ``avg-pool`` / ``deep-norm-avg-pool``: ``plain`` / ``deep-norm`` pooled by the mean patch token, not the class token;
- ``resnet10t`` / ``resnet10t-avg-pool``: timm's ResNet-10-T stride-4 features as the stem (a hybrid ViT), class-token /
  mean-token pooling.

Reported every ``--every`` steps on 1,000 validation scenes (glyphs unseen in training): the share of scenes whose
whole digit set is predicted exactly, and per-digit accuracy (0.812 is the prior: "no digit present" everywhere).

    python bench/scene_clip_stem.py --stems plain deep-norm --steps 600 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.atomic import save_text
from ditlab.data.scenes import DigitScenes
from ditlab.metrics.features import one_cycle_adamw
from ditlab.metrics.scene_clip import SceneCLIP, SceneCLIPRecipe, digit_presence_targets, grammar_vocabulary
from ditlab.models.text.tokenizer import Tokenizer
from ditlab.threads import machine_record

STEMS = {"plain": {}, "deep": {"stem_layers": 4}, "deep-norm": {"stem_layers": 4, "stem_norm": "group"},
         "batch-norm": {"stem_norm": "batch"}, "deep-batch-norm": {"stem_layers": 4, "stem_norm": "batch"},
         "avg-pool": {"pool": "avg"}, "deep-norm-avg-pool": {"stem_layers": 4, "stem_norm": "group", "pool": "avg"},
         "resnet10t": {"trunk": "resnet10t"}, "resnet10t-avg-pool": {"trunk": "resnet10t", "pool": "avg"}}


class DigitPresence(nn.Module):
    """The scene CLIP's image tower with a linear head: ten logits, one per digit."""

    def __init__(self, recipe: SceneCLIPRecipe) -> None:
        super().__init__()
        self.visual = SceneCLIP(recipe, grammar_vocabulary(Tokenizer(recipe.context_length))).clip.visual
        self.head = nn.Linear(recipe.embed_dim, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(images)[0])


def batch(scenes: DigitScenes, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
    """The scenes' images and which of the ten digits each holds ``(N, 10)``."""
    return scenes.images(indices), digit_presence_targets(scenes.attributes(indices))


def train(stem: str, args: argparse.Namespace) -> list[dict]:
    recipe = replace(SceneCLIPRecipe(), **STEMS[stem])
    torch.manual_seed(args.seed)
    model = DigitPresence(recipe)
    optimizer, schedule = one_cycle_adamw(model, recipe.lr, recipe.weight_decay, args.steps)
    scenes, validation = DigitScenes("train", length=args.steps * recipe.batch_size), DigitScenes("validation")
    images, truth = batch(validation, range(1000))
    curve, start = [], time.perf_counter()
    for step in range(args.steps):
        inputs, present = batch(scenes, range(step * recipe.batch_size, (step + 1) * recipe.batch_size))
        loss = F.binary_cross_entropy_with_logits(model(inputs), present)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % args.every == 0:
            with torch.no_grad():
                predicted = model.eval()(images) > 0
            model.train()
            row = {"stem": stem, "step": step + 1, "train_loss": loss.item(),
                   "exact_set": (predicted == truth.bool()).all(1).float().mean().item(),
                   "per_digit": (predicted == truth.bool()).float().mean().item(),
                   "seconds": time.perf_counter() - start}  # fmt: skip
            print(json.dumps(row), flush=True)
            curve.append(row)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stems", nargs="+", choices=sorted(STEMS), default=["plain", "deep-norm"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scene_clip_stem.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"machine": machine_record(), "steps": args.steps, "seed": args.seed, "curves": {}}
    for stem in args.stems:  # saved after each stem: a stopped run keeps what it measured
        result["curves"][stem] = train(stem, args)
        save_text(json.dumps(result, indent=2), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
