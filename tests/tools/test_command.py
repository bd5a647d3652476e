"""The tools under one jsonargparse system: typed options with defaults in ``--help``, the shared ``SamplingConfig``
(defaulting to the checkpoint's, reaching the sampler), the accepted spellings, one-line parse errors, and one VAE
decode for latent-space runs."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from ditlab.cli import main
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.diffusion.sample import sample_images
from ditlab.tools.command import TOOLS, normalise, recorded_sampling
from ditlab.tools.sample import to_uint8


def write_checkpoint(dit, path: Path, sampling: SamplingConfig, vae: str | None = None,
                     latent_scale: float = 0.18215) -> Path:  # fmt: skip
    """What ``DiffusionModule`` saves, without training: the weights and the ``ditlab`` entry."""
    torch.save({"state_dict": {f"network.{k}": v for k, v in dit.state_dict().items()},
                "ditlab": {"dit_config": dit.config.to_dict(), "objective": asdict(ObjectiveConfig()),
                           "sampling": asdict(sampling), "vae": vae, "latent_scale": latent_scale}}, path)  # fmt: skip
    return path


RECORDED = SamplingConfig(sampler="ddim", steps=3, cfg_scale=2.0, batch_size=4, time_grid="dit")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dit) -> dict:
    root = tmp_path_factory.mktemp("tools")
    dit = tiny_dit()
    return {"dit": dit, "ckpt": write_checkpoint(dit, root / "run.ckpt", RECORDED), "root": root}


def one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ditlab: error: "), err
    return err[0]


def test_spellings_become_jsonargparse_options():
    argv, fresh = normalise("sample", ["--ckpt", "a.ckpt", "--cfg-scale", "4", "--no-ema", "--class", "3",
                                       "--cache", "fora", "--cache.max-skip", "2", "--batch-size=8"])  # fmt: skip
    assert argv == ["--ckpt", "a.ckpt", "--cfg_scale", "4", "--ema", "false", "--label", "3", "--cache.policy", "fora",
                    "--cache.max_skip", "2", "--batch_size=8"]  # fmt: skip
    assert fresh
    argv, fresh = normalise("encode", ["digits", "--flip", "--no-progress", "--image-size", "32"])
    assert argv == ["--source", "digits", "--flip", "true", "--progress", "false", "--image_size", "32"]
    assert not fresh
    assert normalise("encode", ["digits", "--flip", "false"])[0] == ["--source", "digits", "--flip", "false"]
    assert normalise("eval", ["--cache", "teacache", "--cache.coefficients", "1,-2.5,0"])[0] == [
        "--cache.policy", "teacache", "--cache.coefficients", "[1,-2.5,0]"]
    assert normalise("eval", ["--cache.magnitudes=[1, 0.9]"])[0] == ["--cache.magnitudes=[1, 0.9]"]


@pytest.mark.parametrize("text", ["policy: fora\noptions: {interval: 2}\n", "policy: fora\ninterval: 2\n"])
def test_cache_spellings_become_a_cache_config(tmp_path, text):
    """``--cache FILE`` (the config's ``{policy, options}`` or the old flat form), inline YAML, ``plan:PATH``."""
    from ditlab.diffusion.config import CacheConfig
    from ditlab.tools.command import build_parser, sampling_from

    (tmp_path / "cache.yaml").write_text(text)
    cases = {str(tmp_path / "cache.yaml"): CacheConfig("fora", {"interval": 2}),
             "{policy: toca, options: {ratio: 0.5}}": CacheConfig("toca", {"ratio": 0.5, "interval": 2}),
             "plan:p.json": CacheConfig("plan", {"path": "p.json"})}  # fmt: skip
    for given, expected in cases.items():
        tail = ["--cache.interval", "2"] if given.startswith("{") else []
        argv, _ = normalise("sample", ["--ckpt", "a.ckpt", "--out", "o", "--cache", given, *tail])
        parser = build_parser("sample")
        assert sampling_from(parser.instantiate(parser.parse_args(argv))).cache == expected, given


def test_every_tool_help_lists_its_options_with_defaults(capsys):
    for name in TOOLS:
        assert main([name, "--help"]) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: ditlab {name}") and "--config CONFIG" in text
        assert "default:" in text and text.count("\n  --") >= 4, name
    assert main(["sample", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--num NUM", "--ckpt CKPT", "--time_grid", "--guidance_interval", "--sde.diffusion",
                   "--cache POLICY", "--cache.interval", "--atol"):  # fmt: skip
        assert option in text, option
    assert "number of images. (type: int, default: 64)" in " ".join(text.split())
    assert re.search(r"--steps STEPS .{0,200}?type: int \| null, default: 50\)", " ".join(text.split()))


def test_sampling_defaults_are_the_checkpoints_and_show_in_help(run, capsys):
    assert recorded_sampling(str(run["ckpt"])) == RECORDED
    assert main(["sample", "--ckpt", str(run["ckpt"]), "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"--steps STEPS .{0,200}?type: int \| null, default: 3\)", text)
    assert re.search(r"--time_grid TIME_GRID, .{0,400}?default: dit\)", text)
    assert re.search(r"--sampler SAMPLER .{0,300}?default: ddim\)", text)


def test_recorded_and_given_sampling_options_reach_the_sampler(run):
    """The run's time grid is used by default; --time_grid, --guidance_interval and --steps override it."""
    dit, labels = run["dit"], torch.arange(5) % 10
    objective = ObjectiveConfig().build(dit.learn_sigma)
    cases = {"recorded": ([], {}),
             "given": (["--time-grid", "linspace", "--guidance_interval", "[0.0, 0.5]", "--steps", "2"],
                       {"time_grid": "linspace", "guidance_interval": (0.0, 0.5), "steps": 2})}  # fmt: skip
    for name, (tail, override) in cases.items():
        out = run["root"] / name
        assert main(["sample", "--ckpt", str(run["ckpt"]), "--num", "5", "--out", str(out), *tail]) == 0
        options = {**asdict(RECORDED), **override}
        options.pop("cache")
        expected = sample_images(dit, objective, labels, **options)
        assert np.array_equal(np.load(out / "samples.npz")["arr_0"], to_uint8(expected)), name
    assert not np.array_equal(np.load(run["root"] / "recorded" / "samples.npz")["arr_0"],
                              np.load(run["root"] / "given" / "samples.npz")["arr_0"])  # fmt: skip


def test_options_from_a_config_file_with_the_checkpoints_sampling_defaults(run, tmp_path):
    config = tmp_path / "sample.yaml"
    config.write_text(f"ckpt: {run['ckpt']}\nout: {tmp_path / 'from_file'}\nnum: 2\nlabel: 7\n")
    assert main(["sample", "--config", str(config), "--cfg_scale", "3"]) == 0
    options = {**asdict(RECORDED), "cfg_scale": 3.0}
    options.pop("cache")
    dit = run["dit"]
    expected = sample_images(dit, ObjectiveConfig().build(dit.learn_sigma), torch.tensor([7, 7]), **options)
    with np.load(tmp_path / "from_file" / "samples.npz") as batch:
        assert batch["labels"].tolist() == [7, 7] and np.array_equal(batch["arr_0"], to_uint8(expected))


@pytest.mark.parametrize("tail, expected", [
    (["--bogus", "1"], "unknown option --bogus; run `ditlab sample --help`"),
    (["--steps", "many"], "steps"),
    (["--sde.diffusion", "loud"], "loud"),
    (["--guidance_interval", "[0.9, 0.1]"], "guidance_interval"),
])  # fmt: skip
def test_bad_tool_options_are_one_line(run, tail, expected, capsys):
    line = one_line_error(["sample", "--ckpt", str(run["ckpt"]), "--out", str(run["root"] / "x"), *tail], capsys)
    assert expected in line


def test_missing_required_options_and_sources_are_one_line(run, capsys):
    assert "missing --out" in one_line_error(["sample", "--ckpt", str(run["ckpt"])], capsys)
    assert "give one of --ckpt" in one_line_error(["eval", "--num", "8"], capsys)


def test_latent_runs_decode_through_the_one_vae_function(tmp_path, tiny_dit):
    """``ditlab sample`` on a latent-space run = the sampled latents / latent_scale through the VAE decoder."""
    from diffusers import AutoencoderKL

    from ditlab.data.vae import decode_latents, load_vae

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, layers_per_block=1,
                        latent_channels=4)  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    dit = tiny_dit(in_channels=4, input_size=4)
    sampling = SamplingConfig(sampler="ddim", steps=2, cfg_scale=1.0, batch_size=2)
    ckpt = write_checkpoint(dit, tmp_path / "latent.ckpt", sampling, vae=str(tmp_path / "vae"), latent_scale=0.5)
    assert main(["sample", "--ckpt", str(ckpt), "--num", "3", "--out", str(tmp_path / "s")]) == 0
    latents = sample_images(dit, ObjectiveConfig().build(dit.learn_sigma), torch.arange(3), sampler="ddim", steps=2)
    loaded = load_vae(str(tmp_path / "vae"))
    with torch.no_grad():
        direct = loaded.decode(latents / 0.5).sample
    assert torch.allclose(decode_latents(loaded, latents, 0.5, batch_size=2), direct, atol=1e-5)
    images = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert images.shape == (3, 8, 8, 3)
    assert np.abs(images.astype(int) - to_uint8(direct).astype(int)).max() <= 1  # chunked decode: rounding only


def test_a_bug_in_a_tool_keeps_its_traceback_and_asks_for_a_report(run, monkeypatch, tmp_path):
    from ditlab.cli import REPORT

    def broken(images):
        raise KeyError("an injected bug")

    monkeypatch.setattr("ditlab.tools.sample.to_uint8", broken)
    with pytest.raises(KeyError, match="an injected bug") as raised:
        main(["sample", "--ckpt", str(run["ckpt"]), "--num", "2", "--out", str(tmp_path / "s")])
    assert REPORT in raised.value.__notes__


def test_shell_completion_covers_commands_and_tool_options(monkeypatch, capsys):
    pytest.importorskip("shtab")
    assert main(["--print_completion", "bash"]) == 0
    script = capsys.readouterr().out
    words = script.replace("'", "")  # shtab quotes the words or not, by version
    assert "_ditlab_subparsers=(fit validate test predict sample eval analyze convert encode export)" in words
    options = set(words.split())
    assert {"--cache.interval", "--trainer.max_steps"} <= options and "--no_progress" not in options
    assert len(script) < 1_000_000  # class-valued trainer options are not expanded
    monkeypatch.setattr("ditlab.tools.completion.find_spec", lambda name: None)
    assert "pip install shtab" in one_line_error(["--print_completion", "zsh"], capsys)


def test_export_refuses_a_run_with_nothing_to_export(teacher_file, tmp_path, capsys):
    message = one_line_error(["export", "--ckpt", str(teacher_file), "--out", str(tmp_path / "x")], capsys)
    assert "neither a cache-router run nor a dynamic-compute run" in message and "ditlab convert" in message
