"""Scene CLIP must-shows: build time, held-out retrieval, CLIP score on real vs shuffled pairs, linear probes.

``python bench/scene_clip.py [--retrain] [--probe-train 2000] [--eval 1000] [--out bench/results/scene_clip.json]
[--recipe FIELD=VALUE ...]``

- Build: the default ``SceneCLIPRecipe`` through ``scene_clip()`` (``--retrain`` rebuilds it and times it: wall
  seconds and this process's CPU seconds, which stay meaningful while other jobs share the cores; the load
  average at start and end is recorded). Without ``--retrain`` the cached entry's own build time is reported.
- Retrieval among the first ``--eval`` validation scenes (glyphs never seen in training): image->text and
  text->image top-1/top-5 by index, and "by caption" (a hit when the retrieved caption equals the true one).
- CLIP score (100 * max(cos, 0)) on the real validation pairs vs the same images with captions shifted by one.
- One-edit discrimination: how often an image's own caption scores above the same caption with one attribute
  changed (the first digit, its colour, its size, the relation): 0.5 is blind to that attribute.
- Linear probes (sklearn LogisticRegression on standardised features, trained on ``--probe-train`` training
  scenes, scored on the validation scenes): the first digit's identity, its colour and its position (3x3 cell of
  its centre), on raw pixels vs scene-CLIP image features (the projected embedding, and the flattened patch tokens
  REPA aligns to).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ditlab.data.scenes import DigitScenes
from ditlab.methods.align.encoders.digits_vit import _probe_accuracy
from ditlab.metrics.clip_score import CLIPScore
from ditlab.metrics.scene_clip import SceneCLIPRecipe, embed_scenes, retrieval, scene_clip, scene_clip_path


def load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def by_caption(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, captions: list[str]) -> dict:
    """Top-1 retrieval counting any pair with the query's exact caption as a hit."""
    similarity = image_embeddings @ text_embeddings.T
    to_text = similarity.argmax(1).tolist()
    to_image = similarity.argmax(0).tolist()
    return {"image_to_text_top1_by_caption": sum(captions[j] == captions[i] for i, j in enumerate(to_text)) / len(captions),
            "text_to_image_top1_by_caption": sum(captions[j] == captions[i] for i, j in enumerate(to_image)) / len(captions)}  # fmt: skip


def edited(attributes, kind: str) -> str | None:
    """The caption of ``attributes`` with one attribute of the first digit (or the relation) changed."""
    from dataclasses import replace

    from ditlab.data.scene_grammar import COLOURS

    digits, colours, sizes, relation = list(attributes.digits), list(attributes.colours), list(attributes.sizes), None
    if kind == "digit":
        digits[0] = (digits[0] + 5) % 10
    elif kind == "colour":
        colours[0] = COLOURS[(COLOURS.index(colours[0]) + 3) % len(COLOURS)]
    elif kind == "size":
        sizes[0] = "large" if sizes[0] == "small" else "small"
    elif attributes.relation is None:
        return None
    else:
        relation = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[attributes.relation]
    return replace(attributes, digits=digits, colours=colours, sizes=sizes,
                   relation=relation or attributes.relation).caption()  # fmt: skip


@torch.no_grad()
def edit_discrimination(model, scenes: DigitScenes, count: int, images_embedded: torch.Tensor,
                        texts_embedded: torch.Tensor) -> dict:  # fmt: skip
    """Share of images whose own caption scores above the one-edit caption, per kind of edit."""
    attributes = scenes.attributes(range(count))
    own = (images_embedded * texts_embedded).sum(1)
    result = {}
    for kind in ("digit", "colour", "size", "relation"):
        rows = [i for i, a in enumerate(attributes) if edited(a, kind) is not None]
        negatives = model.encode_captions([edited(attributes[i], kind) for i in rows])
        wins = own[rows] > (images_embedded[rows] * negatives).sum(1)
        result[kind] = {"own_beats_edited": wins.float().mean().item(), "scenes": len(rows)}
    return result


def targets(scenes: DigitScenes, count: int) -> dict[str, torch.Tensor]:
    from ditlab.data.scene_grammar import COLOURS

    attributes = scenes.attributes(range(count))
    cell = [min(int(a.positions[0][1] * 3), 2) * 3 + min(int(a.positions[0][0] * 3), 2) for a in attributes]
    single = torch.tensor([a.count == 1 for a in attributes])
    return {"digit": torch.tensor([a.digits[0] for a in attributes]),
            "colour": torch.tensor([COLOURS.index(a.colours[0]) for a in attributes]),
            "position": torch.tensor(cell), "single": single}  # fmt: skip


@torch.no_grad()
def features(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    embeddings, tokens = [], []
    for chunk in images.split(250):
        embedding, patch = model.image_tokens(chunk)
        embeddings.append(embedding)
        tokens.append(patch.flatten(1))
    return {"pixels": images.flatten(1), "scene_clip_embedding": torch.cat(embeddings),
            "scene_clip_patch_tokens": torch.cat(tokens)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrain", action="store_true", help="rebuild the scene CLIP and time the build")
    parser.add_argument("--eval", type=int, default=1000, help="validation scenes for retrieval and CLIP score")
    parser.add_argument("--probe-train", type=int, default=2000, help="training scenes for the linear probes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads outside the (one-thread) build")
    parser.add_argument("--out", default="bench/results/scene_clip.json")
    parser.add_argument("--recipe", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="change fields of the default SceneCLIPRecipe (e.g. patch_digits=1.0); cached apart")
    args = parser.parse_args()
    defaults = SceneCLIPRecipe()
    try:
        def parsed(key: str, value: str):
            kind = type(getattr(defaults, key))
            return value.lower() in ("1", "true", "yes") if kind is bool else kind(value)

        changes = {key: parsed(key, value) for key, _, value in (item.partition("=") for item in args.recipe)}
        recipe = replace(defaults, **changes)
    except (AttributeError, TypeError, ValueError) as error:
        raise SystemExit(f"--recipe takes FIELD=VALUE with fields of SceneCLIPRecipe: {error}") from None
    torch.set_num_threads(args.threads)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
              platform.machine(), "torch": torch.__version__, "loadavg_start": load(),
              "recipe": asdict(recipe)}  # fmt: skip

    built_now = args.retrain or not scene_clip_path(recipe=recipe).is_file()
    wall, cpu = time.perf_counter(), time.process_time()
    model = scene_clip(recipe=recipe, retrain=args.retrain)
    result["build"] = {"built_now": built_now, "cache_file": scene_clip_path(recipe=recipe).name, "train_seconds": model.train_seconds,
                       "wall_seconds_now": time.perf_counter() - wall, "cpu_seconds_now": time.process_time() - cpu,
                       "loadavg_after": load(), "threads": 1, "scores_at_build": model.scores,
                       "parameters": sum(p.numel() for p in model.parameters())}  # fmt: skip
    print("build", json.dumps(result["build"]))

    validation = DigitScenes("validation", length=args.eval)
    captions = validation.captions(range(args.eval))
    images_embedded, texts_embedded = embed_scenes(model, "validation", args.eval)
    result["retrieval"] = {"pairs": args.eval, **retrieval(images_embedded, texts_embedded),
                           **by_caption(images_embedded, texts_embedded, captions),
                           "distinct_captions": len(set(captions))}  # fmt: skip
    print("retrieval", json.dumps(result["retrieval"]))

    scores = {}
    for name, texts in (("real_pairs", texts_embedded), ("shuffled_pairs", texts_embedded.roll(1, 0))):
        metric = CLIPScore()
        metric.update(images_embedded, texts)
        scores[name] = float(metric.compute())
    result["clip_score"] = {**scores, "pairs": args.eval, "shuffle": "captions shifted by one"}
    print("clip_score", json.dumps(result["clip_score"]))
    result["one_edit"] = edit_discrimination(model, validation, args.eval, images_embedded, texts_embedded)
    print("one_edit", json.dumps(result["one_edit"]))

    train = DigitScenes("train", length=args.probe_train)
    train_images, test_images = train.images(range(args.probe_train)), validation.images(range(args.eval))
    train_targets, test_targets = targets(train, args.probe_train), targets(validation, args.eval)
    train_features, test_features = features(model, train_images), features(model, test_images)
    probes = {}
    for space in train_features:
        probes[space] = {"dim": train_features[space].shape[1]}
        for task in ("digit", "colour", "position"):
            probes[space][task] = _probe_accuracy(train_features[space], train_targets[task], test_features[space],
                                                  test_targets[task])  # fmt: skip
        train_single, test_single = train_targets["single"], test_targets["single"]
        probes[space]["digit_single_digit_scenes"] = _probe_accuracy(
            train_features[space][train_single], train_targets["digit"][train_single],
            test_features[space][test_single], test_targets["digit"][test_single])  # fmt: skip
        print("probe", space, json.dumps(probes[space]))
    result["linear_probe"] = {"train_scenes": args.probe_train, "validation_scenes": args.eval,
                              "tasks": "first digit's identity (10), colour (8), position (3x3 cell); the digit on single-digit scenes", **probes}  # fmt: skip
    result["loadavg_end"] = load()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
