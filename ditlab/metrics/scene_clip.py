"""Scene CLIP: a small CLIP (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language
Supervision") that ditlab trains itself on the digit scenes, once per recipe, cached under ``$DITLAB_CACHE``.

Why: CLIP score (Hessel et al., 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning"),
text conditioning, scene FID and alignment targets all need an image-text model that knows digits, colours,
sizes and layouts on 32x32 canvases, and a public CLIP cannot be downloaded on a compute node nor sees 32x32
digit scenes. The towers are open_clip's own (``CustomTextCLIP``: a ViT image tower and a causal text
transformer), configured tiny: an 8x8 token grid on 32x32 (the token grid of a patch-4 DiT) whose patch embedding
is the stride-4 feature map of a randomly initialised timm ResNet-10-T (a hybrid ViT: Dosovitskiy et al., 2021,
section 3.1; glyphs sit anywhere on the canvas and a ViT this small, even behind a convolutional stem as in Xiao et
al., 2021, "Early Convolutions Help Transformers See Better", sits on a plateau that hides their shapes), and a
text tower over the few CLIP-BPE tokens the scene grammar uses (every other token reads as one unknown token, so
any prompt still encodes). Training is CLIP's symmetric contrastive loss over a stream of distinct training
scenes, each image also contrasted with a caption one edit away from its own (a digit, a colour, the relation or a
size changed: NegCLIP's hard negatives, Yuksekgonul et al., 2023, "When and Why Vision-Language Models Behave like
Bags-of-Words"), plus two auxiliary digit losses from the scenes' known layout ([interp], ours): which digits the
scene holds, on the image embedding, and which digit each patch shows, on the patch tokens. Contrastive training
alone matched colours, sizes and backgrounds and never learnt which digit is there (``FIRST_RECIPE``).
Training is deterministic (``reproducible_training``: fixed seeds, one thread, deterministic kernels), and the
weights land in ``<cache>/scene-clip-<hash of recipe and dataset name>.pt`` with held-out retrieval scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.metrics.features import (
    FeatureExtractor,
    cache_root,
    cached_training,
    one_cycle_adamw,
    recipe_digest,
    reproducible_training,
)
from ditlab.models.text.tokenizer import Tokenizer

STEM_NORMS = {"none": None, "group": lambda channels: nn.GroupNorm(min(8, channels), channels),
              "batch": nn.BatchNorm2d}


OPTIONS_ADDED_LATER = {"patch_digits": 0.0, "stem_layers": 2, "stem_norm": "none", "digit_presence": 0.0, "pool": "tok", "trunk": ""}


@dataclass(frozen=True)
class SceneCLIPRecipe:
    """Everything that fixes the scene CLIP's weights; its hash (with the dataset's name) names the cache file."""

    image_size: int = 32
    patch_size: int = 4
    width: int = 64
    layers: int = 4
    head_width: int = 32
    conv_stem: int = 32
    stem_layers: int = 2
    """3x3 convolutions in the stem (two of stride 2, the others stride 1 before each of them)."""
    stem_norm: str = "none"
    """``none``, ``group`` or ``batch``: a normalisation after each stem convolution but the last ([interp], ours:
    without one the tower sits on a plateau that hides digit identity, even under a supervised digit loss)."""
    trunk: str = "resnet10t"
    """A timm CNN (e.g. ``resnet10t``, randomly initialised) whose stride-4 features, projected to ``width``, replace
    the convolutional stem: a hybrid ViT (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words", section 3.1)
    whose BatchNorm trunk learns glyph shapes sooner than the tiny ViT does ([interp], ours). Empty: the convolutional
    stem below (``conv_stem`` channels, ``stem_layers``, ``stem_norm``)."""
    pool: str = "tok"
    """How the image tower pools its tokens into the embedding: open_clip's ``tok`` (the class token) or ``avg``
    (the mean patch token)."""
    text_width: int = 64
    text_layers: int = 3
    text_heads: int = 2
    context_length: int = 32
    embed_dim: int = 64
    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    holdout: int = 1000
    hard_negatives: bool = True
    patch_digits: float = 1.0
    """Weight of a dense auxiliary loss: a linear head on every image patch token names the digit whose box covers
    the patch centre (or none), from the scenes' known layout ([interp], ours: the contrastive loss alone leaves the
    image tower blind to digit identity). Behind the 2-conv stem it did not help (the head learnt digit vs
    background only); with the ResNet trunk and ``digit_presence`` it is what makes the tower digit-aware."""
    digit_presence: float = 4.0
    """Weight of an auxiliary multi-label loss: a linear head on the image embedding says which of the ten digits
    the scene holds, from its attributes ([interp], ours: it puts digit identity into the embedding that CLIP
    score and the one-edit check read, where the contrastive signal alone is too weak to get it there)."""
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if self.stem_norm not in STEM_NORMS:
            raise ValueError(f"stem_norm must be one of {', '.join(STEM_NORMS)}; got {self.stem_norm!r}")
        if self.pool not in ("tok", "avg"):
            raise ValueError(f"pool must be tok (the class token) or avg (the mean patch token); got {self.pool!r}")

    def digest(self, dataset: str) -> str:
        fields = asdict(self)
        for name, before in OPTIONS_ADDED_LATER.items():  # at the value it had before the option existed, the
            if fields[name] == before:  # recipe is that earlier one, and so is its cache file
                del fields[name]
        return recipe_digest(fields, dataset=dataset)


FIRST_RECIPE = SceneCLIPRecipe(trunk="", steps=600, patch_digits=0.0, digit_presence=0.0)
"""The default recipe until 2026-12-07 (cache ``scene-clip-923f8c2d28e7``): the 2-conv stem, contrastive loss and
hard negatives only. It matched captions by colour, size and background but not by digit; text-conditioned
networks recorded before text encoders were pinned read their captions with it."""


def convolutional_stem(channels: int, width: int, layers: int, norm: str = "none") -> nn.Sequential:
    """``layers`` 3x3 convolutions with GELU between them that downsample 4x (two of stride 2); the stride-1 ones
    come before each stride-2 one in turn, so deeper stems see a whole glyph (13 px with four layers) per token."""
    if layers < 2:
        raise ValueError(f"a convolutional stem downsamples 4x and needs at least 2 layers; got stem_layers={layers}")
    if norm not in STEM_NORMS:
        raise ValueError(f"stem_norm must be one of {', '.join(STEM_NORMS)}; got {norm!r}")
    extra = layers - 2
    strides = [1] * ((extra + 1) // 2) + [2] + [1] * (extra // 2) + [2]
    modules, inputs = [], 3
    for index, stride in enumerate(strides):
        outputs = width if index == len(strides) - 1 else channels
        modules.append(nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1))
        if index < len(strides) - 1:
            if STEM_NORMS[norm] is not None:
                modules.append(STEM_NORMS[norm](outputs))
            modules.append(nn.GELU())
        inputs = outputs
    return nn.Sequential(*modules)


class CNNTrunk(nn.Module):
    """A timm CNN's stride-4 feature map, projected to the ViT's width by a 1x1 convolution."""

    def __init__(self, name: str, width: int) -> None:
        super().__init__()
        import timm

        try:
            self.features = timm.create_model(name, pretrained=False, features_only=True, out_indices=(1,))
        except RuntimeError as error:  # timm's "Unknown model"
            raise ValueError(f"trunk {name!r} is not a timm model name ({error}); try resnet10t") from None
        if self.features.feature_info.reduction()[-1] != 4:
            raise ValueError(f"trunk {name!r}: its second feature level is not at stride 4; try resnet10t")
        self.project = nn.Conv2d(self.features.feature_info.channels()[-1], width, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(images)[-1])


def grammar_vocabulary(tokenizer: Tokenizer) -> torch.Tensor:
    """Sorted CLIP-BPE ids of every word the scene grammar can write (captions built by the grammar itself)."""
    from ditlab.data.scene_grammar import BACKGROUNDS, COLOURS, DIGIT_WORDS, RELATIONS, SIZES, SceneAttributes

    captions = []
    for i in range(max(len(BACKGROUNDS), len(COLOURS), len(DIGIT_WORDS), len(RELATIONS), len(SIZES))):
        pick = [values[(i + shift) % len(values)] for shift, values in enumerate((COLOURS, COLOURS, COLOURS))]
        sizes = [SIZES[(i + shift) % len(SIZES)] for shift in range(3)]
        digits = [int(DIGIT_WORDS[(i + shift) % len(DIGIT_WORDS)]) for shift in range(3)]
        background = BACKGROUNDS[i % len(BACKGROUNDS)]
        captions.append(SceneAttributes(digits[:1], pick[:1], sizes[:1], background=background).caption())
        captions.append(SceneAttributes(digits[:2], pick[:2], sizes[:2], relation=RELATIONS[i % len(RELATIONS)],
                                        background=background).caption())  # fmt: skip
        captions.append(SceneAttributes(digits, pick, sizes, background=background).caption())
    ids, mask = tokenizer(captions)
    return torch.unique(ids[mask])


class SceneCLIP(nn.Module):
    """open_clip's towers, tiny; images ``(B, 3, H, W)`` in [-1, 1] and captions in, embeddings and tokens out.

    ``vocabulary``: the CLIP-BPE ids the text tower embeds (id ``k`` of it is row ``k + 1``; row 0 is padding and
    the last row every other token).
    """

    def __init__(self, recipe: SceneCLIPRecipe, vocabulary: torch.Tensor) -> None:
        super().__init__()
        try:
            from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP
        except ImportError as error:
            raise ModuleNotFoundError("the scene CLIP needs open_clip: pip install open_clip_torch") from error
        self.recipe = recipe
        self.tokenizer = Tokenizer(recipe.context_length)
        lookup = torch.full((self.tokenizer.vocab_size,), len(vocabulary) + 1, dtype=torch.long)
        lookup[vocabulary] = torch.arange(1, len(vocabulary) + 1)
        self.register_buffer("vocabulary", vocabulary.clone())
        self.register_buffer("lookup", lookup, persistent=False)
        vision = CLIPVisionCfg(layers=recipe.layers, width=recipe.width, head_width=recipe.head_width,
                               patch_size=recipe.patch_size, image_size=recipe.image_size, output_tokens=True,
                               pool_type=recipe.pool)  # fmt: skip
        text = CLIPTextCfg(context_length=recipe.context_length, vocab_size=len(vocabulary) + 2,
                           width=recipe.text_width, heads=recipe.text_heads, layers=recipe.text_layers,
                           pool_type="eos", eos_id=int(lookup[self.tokenizer.eot_id]), output_tokens=True)  # fmt: skip
        self.clip = CustomTextCLIP(recipe.embed_dim, vision, text)
        if (recipe.trunk or recipe.conv_stem) and recipe.patch_size != 4:
            raise ValueError(f"trunk and conv_stem downsample 4x and need patch_size 4; got {recipe.patch_size}")
        if recipe.trunk:  # open_clip's ViT calls conv1 once: (B, 3, H, W) -> (B, width, grid, grid)
            self.clip.visual.conv1 = CNNTrunk(recipe.trunk, recipe.width)
        elif recipe.conv_stem:
            self.clip.visual.conv1 = convolutional_stem(recipe.conv_stem, recipe.width, recipe.stem_layers, recipe.stem_norm)
        self.digit_head = nn.Linear(recipe.width, 11) if recipe.patch_digits else None  # 10 digits + none
        self.presence_head = nn.Linear(recipe.embed_dim, 10) if recipe.digit_presence else None

    @property
    def grid(self) -> int:
        return self.recipe.image_size // self.recipe.patch_size

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact ids ``(B, L)`` for the text tower and the mask (True for start..end-of-text)."""
        ids, mask = self.tokenizer(captions)
        device = self.lookup.device
        return torch.where(mask.to(device), self.lookup[ids.to(device)], 0), mask.to(device)

    def image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding (B, E), patch tokens (B, grid^2, width))``; images resized to the recipe's size."""
        size = self.recipe.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=images.shape[-1] > size)  # fmt: skip
        return self.clip.visual(images)

    def text_tokens(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(embedding (B, E), tokens (B, L, text_width), mask (B, L))`` of the captions."""
        ids, mask = self.tokenize(captions)
        embedding, tokens = self.clip.text(ids)
        return embedding, tokens, mask

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_tokens(images)[0], dim=-1)

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        return F.normalize(self.text_tokens(captions)[0], dim=-1)

    def loss(self, images: torch.Tensor, captions: list[str], negatives: list[str] = (),
             patch_targets: torch.Tensor | None = None, presence: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """CLIP's symmetric cross-entropy over the batch's image-caption similarities; ``negatives`` are extra
        captions every image is contrasted with (image->text only, as NegCLIP); ``patch_targets: (B, grid^2)``
        (:func:`patch_digit_targets`) adds the dense digit loss, weighted by the recipe's ``patch_digits``;
        ``presence: (B, 10)`` (:func:`digit_presence_targets`) the digit-presence loss, weighted by
        ``digit_presence``."""
        embedding, tokens = self.image_tokens(images)
        texts = self.encode_captions(list(captions) + list(negatives))
        logits = self.clip.logit_scale.exp() * F.normalize(embedding, dim=-1) @ texts.T
        labels = torch.arange(len(images), device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, : len(images)].T, labels)) / 2
        if patch_targets is not None and self.digit_head is not None:
            dense = self.digit_head(tokens).flatten(0, 1)
            loss = loss + self.recipe.patch_digits * F.cross_entropy(dense, patch_targets.flatten().to(dense.device))
        if presence is not None and self.presence_head is not None:
            logits = self.presence_head(embedding)
            loss = loss + self.recipe.digit_presence * F.binary_cross_entropy_with_logits(logits, presence.to(logits))
        return loss


def digit_presence_targets(attributes: list) -> torch.Tensor:
    """``(B, 10)``: 1 where the scene holds that digit (once or more), else 0."""
    targets = torch.zeros(len(attributes), 10)
    for row, scene in enumerate(attributes):
        targets[row, list(scene.digits)] = 1.0
    return targets


def patch_digit_targets(attributes: list, grid: int, image_size: int) -> torch.Tensor:
    """``(B, grid^2)`` per patch: the digit whose box covers the patch centre (the nearest centre if several), or
    10 where none does; boxes from the scenes' layout (centre ``positions`` and ``SIZE_PIXELS``)."""
    from ditlab.data.scenes import SIZE_PIXELS

    cell = image_size / grid
    centres = (torch.arange(grid) + 0.5) * cell  # pixel centres of the patch rows / columns
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    targets = torch.full((len(attributes), grid * grid), 10, dtype=torch.long)
    for row, scene in enumerate(attributes):
        nearest = torch.full((grid * grid,), float("inf"))
        for digit, size, (x, y) in zip(scene.digits, scene.sizes, scene.positions):
            half = SIZE_PIXELS[size] * image_size / 32 / 2
            dx, dy = (xs - x * image_size).flatten(), (ys - y * image_size).flatten()
            distance = dx.square() + dy.square()
            inside = (dx.abs() <= half) & (dy.abs() <= half) & (distance < nearest)
            targets[row, inside], nearest[inside] = digit, distance[inside]
    return targets


def hard_negative(attributes, generator: torch.Generator) -> str:
    """A caption one edit from ``attributes``' own: one digit changed (half the time), else one colour changed, else
    the relation flipped (two digits) or one size flipped."""
    from dataclasses import replace

    from ditlab.data.scene_grammar import COLOURS

    def draw(count: int) -> int:
        return int(torch.randint(count, (1,), generator=generator))

    digits, colours, sizes = list(attributes.digits), list(attributes.colours), list(attributes.sizes)
    which, kind, relation = draw(attributes.count), draw(4), attributes.relation
    if kind < 2:
        digits[which] = (digits[which] + 1 + draw(9)) % 10
    elif kind == 2:
        colours[which] = COLOURS[(COLOURS.index(colours[which]) + 1 + draw(len(COLOURS) - 1)) % len(COLOURS)]
    elif relation is not None:
        relation = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
    else:
        sizes[which] = "large" if sizes[which] == "small" else "small"
    return replace(attributes, digits=digits, colours=colours, sizes=sizes, relation=relation).caption()


def retrieval(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict:
    """Top-k accuracy of image->text and text->image retrieval where pair ``i`` matches pair ``i``."""
    similarity = image_embeddings @ text_embeddings.T
    target = torch.arange(len(similarity)).unsqueeze(1)
    scores = {}
    for name, matrix in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        ranked = matrix.argsort(dim=1, descending=True)
        for k in ks:
            scores[f"{name}_top{k}"] = (ranked[:, :k] == target).any(1).float().mean().item()
    return scores


@torch.no_grad()
def embed_scenes(model: SceneCLIP, split: str, count: int, batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image and caption embeddings of the first ``count`` scenes of ``split``."""
    from ditlab.data.scenes import DigitScenes

    scenes = DigitScenes(split, size=model.recipe.image_size, length=count)
    images, texts = [], []
    for start in range(0, count, batch_size):
        items = [scenes[i] for i in range(start, min(start + batch_size, count))]
        images.append(model.encode_images(torch.stack([item["image"] for item in items])))
        texts.append(model.encode_captions([item["caption"] for item in items]))
    return torch.cat(images), torch.cat(texts)


def train_scene_clip(recipe: SceneCLIPRecipe = SceneCLIPRecipe()) -> tuple[SceneCLIP, dict]:
    """Contrastive training on ``steps * batch_size`` distinct training scenes; returns the network and scores.

    Deterministic (fixed seeds, deterministic kernels, one thread) and leaves the caller's RNG untouched. Scores:
    the mean loss of the first and last quarter of steps (at most 50 each) and top-1/top-5 retrieval among ``holdout`` validation scenes.
    """
    from ditlab.data.scenes import DigitScenes
    from ditlab.progress import TaskProgress

    scenes = DigitScenes("train", size=recipe.image_size, length=recipe.steps * recipe.batch_size)
    with reproducible_training(recipe.seed, 0, 0.0) as (generator, _, _):
        model = SceneCLIP(recipe, grammar_vocabulary(Tokenizer(recipe.context_length)))
        optimizer, schedule = one_cycle_adamw(model, recipe.lr, recipe.weight_decay, recipe.steps)
        losses = []
        model.train()
        with TaskProgress("scene CLIP (first use; cached after)", recipe.steps, unit="steps") as bar:
            for step in range(recipe.steps):
                items = [scenes[i] for i in range(step * recipe.batch_size, (step + 1) * recipe.batch_size)]
                negatives = [hard_negative(item["attributes"], generator) for item in items] if recipe.hard_negatives else []
                dense = (patch_digit_targets([item["attributes"] for item in items], model.grid, recipe.image_size)
                         if recipe.patch_digits else None)  # fmt: skip
                presence = digit_presence_targets([item["attributes"] for item in items]) if recipe.digit_presence else None
                loss = model.loss(torch.stack([item["image"] for item in items]), [item["caption"] for item in items],
                                  negatives, dense, presence)  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                bar.advance()
        model.eval()
        window = max(1, min(50, len(losses) // 4))
        scores = {"first_loss": sum(losses[:window]) / window, "last_loss": sum(losses[-window:]) / window}
        if recipe.holdout > 1:
            scores.update(retrieval(*embed_scenes(model, "validation", recipe.holdout)))
    return model.requires_grad_(False), scores


def scene_clip_path(cache_dir: str | Path | None = None, recipe: SceneCLIPRecipe = SceneCLIPRecipe()) -> Path:
    """``<cache>/scene-clip-<hash of recipe and the digit scenes' name>.pt``."""
    from ditlab.data.scenes import SCENES_NAME

    return cache_root(cache_dir) / f"scene-clip-{recipe.digest(SCENES_NAME)}.pt"


def scene_clip(cache_dir: str | Path | None = None, recipe: SceneCLIPRecipe = SceneCLIPRecipe(),
               retrain: bool = False) -> SceneCLIP:  # fmt: skip
    """The scene CLIP, trained once per recipe and dataset, then loaded from ``<cache>/scene-clip-<hash>.pt``.

    The returned network is frozen, in eval mode, and carries ``scores``, ``train_seconds`` and ``fingerprint``.
    """
    from ditlab.data.scenes import SCENES_NAME

    path = scene_clip_path(cache_dir, recipe)

    def train() -> dict:
        model, scores = train_scene_clip(recipe)
        return {"state_dict": model.state_dict(), "scores": scores, "recipe": asdict(recipe), "dataset": SCENES_NAME}

    entry = cached_training(path, train, retrain)
    with torch.random.fork_rng(devices=[]):  # the initialisation is overwritten; keep the caller's RNG
        model = SceneCLIP(recipe, entry["state_dict"]["vocabulary"])
    model.load_state_dict(entry["state_dict"])
    model.scores, model.train_seconds = entry["scores"], entry.get("train_seconds")
    model.fingerprint = path.stem
    return model.requires_grad_(False).eval()


class SceneCLIPFeatures(FeatureExtractor):
    """The scene CLIP's image embeddings (before normalisation) as a FID feature space for the digit scenes.

    It has no class logits, so the Inception Score is not reported on it.
    """

    name = "scene-clip"

    def __init__(self, model: SceneCLIP, batch_size: int = 256, name: str = "scene-clip") -> None:
        super().__init__(batch_size)
        self.model, self.name = model.eval(), name
        self.num_features, self.fingerprint = model.recipe.embed_dim, model.fingerprint

    def _batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[1] != 3:
            raise ValueError(f"scene-clip features take RGB images (N, 3, H, W); got {images.shape[1]} channels")
        return self.model.image_tokens(images.clamp(-1, 1))[0], images.new_zeros(len(images), 0)


def scene_clip_features(cache_dir: str | Path | None = None, batch_size: int = 256,
                        recipe: SceneCLIPRecipe = SceneCLIPRecipe(), name: str = "scene-clip") -> SceneCLIPFeatures:
    """The scene CLIP of ``recipe`` (trained once and cached) as a :class:`FeatureExtractor`."""
    return SceneCLIPFeatures(scene_clip(cache_dir, recipe), batch_size, name)
