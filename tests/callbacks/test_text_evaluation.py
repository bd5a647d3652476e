"""The Evaluation callback on a text-conditioned module: sampled from captions, CLIP score and compositional accuracy
added (with a recognizer that knows the truth, samples that are the captions' own scenes score 1); a
class-conditional module keeps its labels and reports neither."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ditlab.callbacks.evaluation import Evaluation
from ditlab.data.scenes import DigitScenes
from ditlab.metrics import text_eval
from ditlab.metrics.scene_clip import SceneCLIP, SceneCLIPRecipe, grammar_vocabulary
from ditlab.models.text import Tokenizer

TINY = SceneCLIPRecipe(width=32, layers=1, head_width=16, text_width=32, text_layers=1, text_heads=2, embed_dim=16)


class Sampler(nn.Module):
    """Stands in for a method module: returns validation scenes (text) or blank RGB images (labels) and records
    what it was asked to draw."""

    def __init__(self, text: bool) -> None:
        super().__init__()
        self.text_conditioned, self.asked = text, []
        self.sampling_network = SimpleNamespace(num_classes=10)
        self.scale = nn.Parameter(torch.zeros(()))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def sample(self, conditions, seed: int, start: int, **overrides) -> torch.Tensor:
        self.asked.append(conditions)
        return DigitScenes("validation").images(range(start, start + len(conditions)))


@pytest.fixture
def untrained_clip(monkeypatch):
    torch.manual_seed(0)
    model = SceneCLIP(TINY, grammar_vocabulary(Tokenizer(TINY.context_length))).eval()
    monkeypatch.setattr(text_eval, "_scene_clip", lambda cache_dir: model)
    return model


@pytest.fixture(autouse=True)
def truthful_recognizer(monkeypatch, validation_lookup):
    monkeypatch.setattr(text_eval, "_scene_recognizer", lambda cache_dir: validation_lookup)


@pytest.mark.parametrize("text", [True, False])
def test_text_runs_sample_captions_and_add_clip_score(untrained_clip, text):
    trainer = SimpleNamespace(global_rank=0, world_size=1, is_global_zero=True, global_step=3, logger=None)
    evaluation = Evaluation(num_samples=6)
    module = Sampler(text)
    metrics = evaluation._evaluate(trainer, module)
    if text:
        assert sum(module.asked, []) == DigitScenes("validation").captions(range(6))  # in batches, in order
        assert metrics["clip_features"] == "scene-clip" and 0 <= metrics["clip_score"] <= 100
        assert metrics["compositional_accuracy"] == metrics["compositional_digit"] == 1.0
    else:
        assert torch.equal(torch.cat(module.asked), torch.arange(6) % 10) and "clip_score" not in metrics
        assert not any(key.startswith("compositional") for key in metrics)
    assert metrics["num_samples"] == 6 and "fid" in metrics


def test_eval_tool_scores_a_batch_against_its_captions(untrained_clip, tmp_path, capsys):
    import json

    import numpy as np

    from ditlab.tools.eval import evaluate

    images = DigitScenes("validation").images(range(8))
    pixels = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    np.savez(tmp_path / "batch.npz", arr_0=pixels)
    assert evaluate(samples=str(tmp_path / "batch.npz"), captions="validation") == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    expected = text_eval.clip_score_of(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1,
                                       DigitScenes("validation").captions(range(8)))["clip_score"]  # fmt: skip
    assert report["clip_score"] == pytest.approx(expected) and report["protocol"]["captions"] == "validation"
    assert report["compositional_accuracy"] == 1.0  # the batch is the captions' own scenes
    assert "clip_score" in capsys.readouterr().out
