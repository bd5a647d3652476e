"""Text conditioning for the core: captions -> :class:`TextFeatures` (tokens, pooled, mask) through a registered
text-encoder kind (``clip-l`` and ``t5`` from local folders and ``random-words`` here; ``scene-clip`` from ditlab's scene CLIP),
tokenized offline with CLIP's BPE."""

from ditlab.models.text.features import TextEncoder, TextFeatures
from ditlab.models.text.pretrained import CLIPTextEncoder, T5TextEncoder, local_model_folder
from ditlab.models.text.random_words import RandomWords
from ditlab.models.text.registry import TEXT_ENCODERS, build_text_encoder, register_text_encoder
from ditlab.models.text.tokenizer import Tokenizer

__all__ = [
    "TEXT_ENCODERS",
    "CLIPTextEncoder",
    "RandomWords",
    "T5TextEncoder",
    "TextEncoder",
    "TextFeatures",
    "Tokenizer",
    "build_text_encoder",
    "local_model_folder",
    "register_text_encoder",
]
