"""CLIP score: prompts from class names, and a one-line error when no local weights exist (none here)."""

from __future__ import annotations

import pytest
import torch

from ditlab.data.digits import CLASS_NAMES
from ditlab.metrics.clip import class_prompts, clip_score, local_clip


def test_prompts_come_from_class_names():
    labels = torch.arange(12) % 10
    prompts = class_prompts(labels, CLASS_NAMES)
    assert prompts[3] == "a photo of the digit 3" and prompts[11] == "a photo of the digit 1"
    assert class_prompts([0, 2], ["cat", "dog", "ship"], template="a photo of a {}") == [
        "a photo of a cat",
        "a photo of a ship",
    ]
    assert class_prompts([7]) == ["a photo of the digit 7"]
    with pytest.raises(ValueError, match="no class name"):
        class_prompts([10], CLASS_NAMES)


def test_missing_clip_weights_fail_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("DITLAB_CLIP_MODEL", raising=False)
    with pytest.raises(FileNotFoundError) as error:
        local_clip()
    assert "\n" not in str(error.value) and "DITLAB_CLIP_MODEL" in str(error.value)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "clip")):
        clip_score(torch.zeros(2, 1, 16, 16), class_prompts([0, 1]), model=tmp_path / "clip")
    monkeypatch.setenv("DITLAB_CLIP_MODEL", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        local_clip()


def test_one_prompt_per_image():
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(torch.zeros(3, 1, 8, 8), ["a", "b"])
