"""The text slot: CLIP's BPE round trip offline, the registry, and CLIP-L / T5 loaded from local folders (tiny random
configs saved offline) or refused in one line naming the missing file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ditlab.models.text import (
    TEXT_ENCODERS,
    TextFeatures,
    Tokenizer,
    build_text_encoder,
    register_text_encoder,
)
from ditlab.models.text.features import TextEncoder

transformers = pytest.importorskip("transformers")
CAPTION = "a small red 3 left of a large blue 7 on a grey background"


def test_tokenizer_round_trip_and_mask():
    tokenizer = Tokenizer(context_length=24)
    ids, mask = tokenizer(["A  Small red 3 left of a large blue 7 on a grey background", ""])
    assert ids.shape == mask.shape == (2, 24) and mask.dtype == torch.bool
    assert tokenizer.decode(ids, mask) == [CAPTION, ""] == tokenizer.decode(ids)
    assert ids[0, 0] == tokenizer.sot_id and ids[0, mask[0].sum() - 1] == tokenizer.eot_id
    assert mask[1].sum() == 2 and (ids[1, 2:] == 0).all()  # the null caption: start and end of text only
    assert tokenizer.lengths([CAPTION]) == [mask[0].sum().item()]


def test_tokenizer_truncates_like_clip():
    ids, mask = Tokenizer(context_length=6)([CAPTION])
    assert mask.all() and ids[0, -1] == Tokenizer(6).eot_id
    assert Tokenizer(6).decode(ids) == ["a small red 3"]
    with pytest.raises(ValueError, match="list of captions"):
        Tokenizer(6)(CAPTION)


def test_text_features_check_shapes_and_stack():
    features = TextFeatures(torch.zeros(2, 5, 8), torch.zeros(2, 4), torch.ones(2, 5, dtype=torch.bool))
    both = TextFeatures.cat([features, features[1]])
    assert len(both) == 3 and both.mask.dtype == torch.bool and both.to(torch.float64).tokens.dtype == torch.float64
    with pytest.raises(ValueError, match="bool"):
        TextFeatures(torch.zeros(2, 5, 8), torch.zeros(2, 4), torch.ones(2, 5))


def test_registry_builds_frozen_and_refuses_unknown():
    @register_text_encoder("test-bag")
    def bag() -> TextEncoder:
        return BagOfTokens()

    encoder = build_text_encoder("test-bag")
    features = encoder([CAPTION, ""])
    assert features.tokens.shape == (2, 8, 4) and not features.tokens.requires_grad and not encoder.training
    assert encoder.null(3).mask.sum(1).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="unknown text encoder kind 'nope'"):
        build_text_encoder("nope")
    with pytest.raises(ValueError, match="not one string"):
        encoder(CAPTION)
    TEXT_ENCODERS.pop("test-bag")


class BagOfTokens(TextEncoder):
    name, dim, pooled_dim, max_length = "test-bag", 4, 4, 8

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(49408, 4)
        self.tokenizer = Tokenizer(8)

    def encode(self, captions):
        ids, mask = self.tokenizer(captions)
        tokens = self.embedding(ids)
        return TextFeatures(tokens, tokens.mean(1), mask)


# ------------------------------------------------------------------------------------------------ CLIP-L, T5
def tiny_clip(folder: Path) -> Path:
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=49407)
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(folder)
    return folder


def tiny_t5(folder: Path) -> Path:
    from tokenizers import Tokenizer as Fast
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing

    words = ["<pad>", "</s>", "<unk>", *sorted(set(CAPTION.split()))]
    fast = Fast(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    fast.pre_tokenizer = Whitespace()
    fast.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])  # T5 ends with </s>
    transformers.PreTrainedTokenizerFast(tokenizer_object=fast, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(folder)  # fmt: skip
    config = transformers.T5Config(vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(folder)
    return folder


def test_clip_l_loads_from_a_local_folder(tmp_path):
    folder = tiny_clip(tmp_path / "clip")
    encoder = build_text_encoder("clip-l", path=str(folder))
    features = encoder([CAPTION, ""])
    assert features.tokens.shape == (2, 16, 16) and features.pooled.shape == (2, 16)
    assert features.mask.sum(1).tolist() == [16, 2]  # the caption is truncated to the context of 16
    reference = transformers.CLIPTextModel.from_pretrained(folder)(input_ids=Tokenizer(16, 49407)([""])[0])
    torch.testing.assert_close(features.pooled[1:], reference.pooler_output)
    penultimate = build_text_encoder("clip-l", path=str(folder), hidden_layer=-2)([""])
    assert not torch.allclose(penultimate.tokens, features.tokens[1:])


def test_t5_loads_from_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DITLAB_T5_MODEL", str(tiny_t5(tmp_path / "t5")))
    features = build_text_encoder("t5", max_length=12)([CAPTION, ""])
    assert features.tokens.shape == (2, 12, 16) and features.mask.sum(1).tolist() == [12, 1]  # "" is "</s>"
    torch.testing.assert_close(features.pooled[0], features.tokens[0][features.mask[0]].mean(0))


@pytest.mark.parametrize("kind, env, wanted", [("clip-l", "DITLAB_CLIP_MODEL", "config.json"),
                                               ("t5", "DITLAB_T5_MODEL", "config.json")])
def test_offline_loaders_fail_in_one_line(tmp_path, monkeypatch, kind, env, wanted):
    monkeypatch.delenv(env, raising=False)
    with pytest.raises(FileNotFoundError, match=f"none was given; set the text encoder's path option \\(or {env}\\)"):
        build_text_encoder(kind)
    with pytest.raises(FileNotFoundError, match="does not exist") as missing:
        build_text_encoder(kind, path=str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"has no {wanted}") as empty:
        build_text_encoder(kind, path=str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no one of model.safetensors") as weights:
        build_text_encoder(kind, path=str(tmp_path / "empty"))
    for error in (missing, empty, weights):
        assert "\n" not in str(error.value) and env in str(error.value)


def test_t5_without_tokenizer_names_it(tmp_path):
    folder = tiny_t5(tmp_path / "t5")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="T5 tokenizer folder .* has no one of tokenizer.json, spiece.model"):
        build_text_encoder("t5", path=str(folder))
