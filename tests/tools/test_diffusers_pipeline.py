"""``ditlab convert --format diffusers`` writes a pipeline a diffusers user loads and calls with no ditlab: a script
that imports only torch and diffusers samples what ``ditlab sample`` samples on the same noise (DDIM)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from ditlab.checkpoint import sample_checkpoint
from ditlab.cli import main

USER_SCRIPT = """
    import sys, torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    generators = [torch.Generator().manual_seed(i) for i in range(6)]  # image i from seed i, as ditlab sample
    images = pipe(class_labels=[i % 10 for i in range(6)], guidance_scale=2.0, num_inference_steps=4,
                  generator=generators, output_type="pt").images
    torch.save(images, sys.argv[2])
    assert not [name for name in sys.modules if name.startswith("ditlab")]
    print(type(pipe).__name__, type(pipe.scheduler).__name__)
"""


@pytest.mark.slow  # ~40 s: the user's script is a fresh Python process
def test_a_diffusers_user_samples_the_exported_pipeline_as_ditlab_sample_does(tmp_path, teacher_file, capsys):
    """The tiny teacher samples with DDIM, 4 steps, guidance 2 (pixel space, 10 classes, learned sigma)."""
    folder = tmp_path / "pipeline"
    assert main(["convert", "--ckpt", str(teacher_file), "--out", str(folder), "--format", "diffusers"]) == 0
    said = capsys.readouterr()
    assert said.err == "" and len(said.out.strip().splitlines()) == 1  # one line, no stray diffusers warning
    assert "pixel space, no VAE" in said.out and "trust_remote_code=True" in said.out
    assert "pixel-space" in (folder / "README.md").read_text()
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDIMScheduler"]
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(USER_SCRIPT), str(folder), str(tmp_path / "out.pt")],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[:2] == ["DitlabDiTPipeline", "DDIMScheduler"]
    theirs = torch.load(tmp_path / "out.pt") * 2 - 1
    ours = sample_checkpoint(teacher_file, torch.arange(6) % 10)
    difference = (theirs - ours).abs().max().item()
    print(f"max |diffusers pipeline - ditlab sample| = {difference:.3g}")
    assert difference < 1e-5
