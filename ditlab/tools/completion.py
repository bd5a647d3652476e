"""``ditlab --print_completion bash|zsh|tcsh``: a shell completion script for every command and its options.

jsonargparse writes it with shtab (an optional package: ``pip install shtab``) from one parser that holds every
command as a subcommand: the tools' own parsers, and for fit/validate/test/predict the trainer's options with
``--config``, ``--model``, ``--data``, ``--seed_everything`` and ``--ckpt_path`` (a model's or datamodule's own
``init_args`` depend on the class a config names, so they are not completed). Set it up once:

    ditlab --print_completion bash > ~/.local/share/bash-completion/completions/ditlab   # bash
    ditlab --print_completion zsh > "${fpath[1]}/_ditlab"                                 # zsh
"""

from __future__ import annotations

from importlib.util import find_spec

from jsonargparse import ActionConfigFile, ArgumentParser

SHELLS = ("bash", "zsh", "tcsh")


def lightning_parser(name: str) -> ArgumentParser:
    """What completion needs of ``ditlab fit`` (and validate/test/predict): the fixed option names."""
    import lightning as L
    from lightning.pytorch.cli import LightningArgumentParser

    from ditlab.callbacks.reliability import NaNGuard
    from ditlab.methods.base import DiffusionModule

    parser = LightningArgumentParser(prog=f"ditlab {name}")
    parser.add_argument("--config", action=ActionConfigFile, help="a config file (configs/*.yaml)")
    parser.add_argument("--seed_everything", type=bool | int, default=0)
    parser.add_argument("--ckpt_path", type=str | None, default=None)
    # the class-valued trainer options stay plain names here: expanded, the strategies' nested types alone
    # make a script of tens of megabytes
    nested = ("strategy", "callbacks", "logger", "plugins", "profiler", "accelerator")
    parser.add_class_arguments(L.Trainer, "trainer", skip=set(nested))
    for option in nested:
        parser.add_argument(f"--trainer.{option}", type=str | None, default=None)
    parser.add_lightning_class_args(NaNGuard, "nan_guard")
    parser.add_subclass_arguments(DiffusionModule, "model", required=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=False)
    return parser


def completion_parser() -> ArgumentParser:
    """``ditlab`` with every command as a subcommand."""
    from ditlab.cli import LIGHTNING_COMMANDS
    from ditlab.tools.command import TOOLS, build_parser

    parser = ArgumentParser(prog="ditlab")
    parser.add_argument("--verbose", action="store_true", help="show every Lightning notice and warning")
    commands = parser.add_subcommands(required=True)
    for name, summary in LIGHTNING_COMMANDS.items():
        commands.add_subcommand(name, lightning_parser(name), help=summary)
    for name, tool in TOOLS.items():
        commands.add_subcommand(name, build_parser(name), help=tool.summary)
    return parser


def completion_script(shell: str) -> str:
    """The completion script for ``shell``; a one-line error when shtab is missing or the shell is unknown."""
    if shell not in SHELLS:
        raise ValueError(f"--print_completion {shell!r}: choose one of {', '.join(SHELLS)}")
    if not find_spec("shtab"):
        raise ValueError("shell completion is written by the shtab package: pip install shtab, then rerun "
                         f"`ditlab --print_completion {shell}`")  # fmt: skip
    return completion_parser().get_completion_script(f"shtab-{shell}")
