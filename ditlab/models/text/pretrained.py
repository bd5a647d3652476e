"""The public text encoders of text-to-image DiTs, from local folders only: CLIP-L and T5.

- ``clip-l``: the CLIP ViT-L/14 text transformer (Radford et al., 2021) that SD3 and FLUX condition on, as
  ``transformers.CLIPTextModel``; tokenized by CLIP's own BPE (:mod:`ditlab.models.text.tokenizer`), padded
  with end-of-text as Hugging Face's tokenizer does. Tokens: the last hidden state (or ``hidden_layer``, e.g.
  -2 for SD3's penultimate layer); pooled: the end-of-text embedding after the final norm (``pooler_output``).
- ``t5``: the T5 v1.1 encoder (Raffel et al., 2020) of PixArt, SD3 and FLUX, as ``transformers.T5EncoderModel``
  with its own tokenizer from the same folder. Tokens: the last hidden state with its attention mask; pooled:
  the masked mean of the tokens (T5 has no pooled output; no T2I DiT reads it).

A folder is a ``save_pretrained`` copy or a diffusers pipeline's component folder (``subfolder``:
``text_encoder``, ``text_encoder_3``, ...). Nothing is downloaded: a missing folder, config, weight or
tokenizer file ends in one ``FileNotFoundError`` line naming it, the option and the environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path

from ditlab.models.text.features import TextEncoder, TextFeatures
from ditlab.models.text.registry import register_text_encoder
from ditlab.models.text.tokenizer import Tokenizer

CLIP_L_MODEL = "openai/clip-vit-large-patch14"
T5_MODEL = "google/t5-v1_1-xxl"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def local_model_folder(what: str, path: str | Path | None, subfolder: str | None, env: str, repo: str,
                       needs: tuple[tuple[str, ...], ...] = (("config.json",), WEIGHT_FILES)) -> Path:  # fmt: skip
    """``path`` (else ``$env``) joined with ``subfolder``, checked to hold one file of each group in ``needs``."""
    hint = (f"set the text encoder's path option (or {env}) to a local copy: on a networked machine "
            f"`hf download {repo} --local-dir DIR`")  # fmt: skip
    explicit = path or os.environ.get(env)
    if not explicit:
        raise FileNotFoundError(f"{what} needs a local model folder and none was given; {hint}")
    folder = Path(explicit).expanduser() / (subfolder or "")
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist; {hint}")
    for group in needs:
        if not any((folder / name).is_file() for name in group):
            missing = group[0] if len(group) == 1 else f"one of {', '.join(group)}"
            pipeline = (" (a pipeline folder: give subfolder, e.g. text_encoder)"
                        if (folder / "model_index.json").is_file() else "")  # fmt: skip
            raise FileNotFoundError(f"{what} folder {folder} has no {missing}{pipeline}; {hint}")
    return folder


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ModuleNotFoundError("CLIP-L and T5 text encoders need transformers: pip install transformers") from error
    return transformers


class CLIPTextEncoder(TextEncoder):
    """CLIP-L's text transformer with CLIP's BPE (context 77, end-of-text padding)."""

    name = "clip-l"

    def __init__(self, path: str | Path | None = None, subfolder: str | None = None,
                 hidden_layer: int | None = None) -> None:  # fmt: skip
        super().__init__()
        folder = local_model_folder("CLIP-L text encoder", path, subfolder, "DITLAB_CLIP_MODEL", CLIP_L_MODEL)
        self.model = _transformers().CLIPTextModel.from_pretrained(folder, local_files_only=True).eval()
        config = self.model.config
        self.hidden_layer = hidden_layer
        self.dim = self.pooled_dim = config.hidden_size
        self.max_length = config.max_position_embeddings
        self.tokenizer = Tokenizer(self.max_length, pad_id=Tokenizer(2).eot_id)
        if config.vocab_size != self.tokenizer.vocab_size:
            raise ValueError(f"{folder} has a vocabulary of {config.vocab_size}, not CLIP's {self.tokenizer.vocab_size}; "
                             "give a CLIP text encoder (CLIP-L)")  # fmt: skip

    def encode(self, captions: list[str]) -> TextFeatures:
        ids, mask = self.tokenizer(captions)
        output = self.model(input_ids=ids.to(self.device), output_hidden_states=self.hidden_layer is not None)
        tokens = output.last_hidden_state if self.hidden_layer is None else output.hidden_states[self.hidden_layer]
        return TextFeatures(tokens, output.pooler_output, mask.to(tokens.device))


class T5TextEncoder(TextEncoder):
    """T5's encoder with its own tokenizer (padded to ``max_length``: 120 as PixArt-alpha, 300 as PixArt-sigma)."""

    name = "t5"

    def __init__(self, path: str | Path | None = None, subfolder: str | None = None,
                 tokenizer_subfolder: str | None = None, max_length: int = 120) -> None:  # fmt: skip
        super().__init__()
        if max_length < 1:
            raise ValueError(f"t5 max_length={max_length} must be >= 1")
        folder = local_model_folder("T5 text encoder", path, subfolder, "DITLAB_T5_MODEL", T5_MODEL)
        tokenizer_folder = local_model_folder("T5 tokenizer", path, tokenizer_subfolder or subfolder,
                                              "DITLAB_T5_MODEL", T5_MODEL, (TOKENIZER_FILES,))  # fmt: skip
        transformers = _transformers()
        self.model = transformers.T5EncoderModel.from_pretrained(folder, local_files_only=True).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
        self.dim, self.max_length = self.model.config.d_model, max_length
        self.pooled_dim = self.dim

    def encode(self, captions: list[str]) -> TextFeatures:
        batch = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")  # fmt: skip
        mask = batch["attention_mask"].bool().to(self.device)
        tokens = self.model(input_ids=batch["input_ids"].to(self.device), attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1)
        return TextFeatures(tokens, pooled, mask)


@register_text_encoder("clip-l")
def clip_l(path: str | None = None, subfolder: str | None = None, hidden_layer: int | None = None) -> CLIPTextEncoder:
    """CLIP-L's text encoder from ``path`` (or ``$DITLAB_CLIP_MODEL``)."""
    return CLIPTextEncoder(path, subfolder, hidden_layer)


@register_text_encoder("t5")
def t5(path: str | None = None, subfolder: str | None = None, tokenizer_subfolder: str | None = None,
       max_length: int = 120) -> T5TextEncoder:  # fmt: skip
    """T5's encoder from ``path`` (or ``$DITLAB_T5_MODEL``)."""
    return T5TextEncoder(path, subfolder, tokenizer_subfolder, max_length)
