"""The ``ditlab`` command: LightningCLI (OmegaConf mode) for fit/validate/test/predict, plus tools.

``ditlab fit --config configs/dit.yaml [--trainer.max_steps 100 ...]`` trains; ``ditlab sample``,
``ditlab convert`` work from a checkpoint. Bad input ends in one line that names the key or file and
the fix, with exit code 2 (set ``DITLAB_DEBUG=1`` for the full traceback). Ctrl-C (SIGINT) or SIGTERM stop a
run after saving ``interrupted.ckpt``, with the shell's exit codes 130 / 143; a child run ditlab starts (the teacher
build) is stopped with it. Checkpoints are read as plain data only; ``DITLAB_TRUST_CHECKPOINTS=1`` reads a file
you trust fully (``ditlab.models.loading``).
"""

from __future__ import annotations

import os
import re
import sys
import warnings

import lightning as L
from jsonargparse import lazy_instance, set_parsing_settings
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ditlab.callbacks.interrupt import SaveOnInterrupt
from ditlab.callbacks.monitor import StepProgressBar, TrainingMonitor
from ditlab.callbacks.reliability import NaNGuard, ResumeState
from ditlab.callbacks.summary import RunSummary
from ditlab.checkpoint_io import AtomicCheckpointIO
from ditlab.methods.base import DiffusionModule
from ditlab.models.loading import check_checkpoint

TOOLS = {
    "sample": "ditlab.tools.sample",
    "convert": "ditlab.tools.convert",
    "eval": "ditlab.tools.eval",
    "analyze": "ditlab.tools.analyze",
    "encode": "ditlab.tools.encode",
}


class UsageError(Exception):
    """Bad input from the command line or a config file; reported in one line."""


def condense(message: str) -> str:
    """jsonargparse's nested, multi-line validation messages -> the one line a user needs."""
    text = str(message)
    unknown = re.search(r"unrecognized arguments: (\S+)", text, re.IGNORECASE)
    if unknown:
        return f"unknown option {unknown.group(1)}; run `ditlab fit --help` to list the valid keys"
    keys = re.findall(r'Parser key "([^"]+)"', text)
    noise = ("Does not validate", "Subtypes", "Errors:", "Given value", "Expected a <class 'NoneType'>")
    details = []
    for piece in re.split(r"\n| - ", text):
        piece = re.sub(r"^-\s+", "", re.sub(r'Parser key "[^"]+":\s*', "", piece).strip()).strip()
        if piece and not piece.startswith(noise):
            details.append(re.sub(r"<class '([\w.]+)'>", r"\1", piece))
    detail = details[0] if details else text.splitlines()[0]
    where = ".".join(key for key in keys if key != "config")
    hint = "; run `ditlab fit --help` to list the valid keys" if "not accepted" in detail else ""
    detail = detail.split("; run `ditlab")[0]
    return f"{where}: {detail}{hint}" if where else f"{detail}{hint}"


def state_dict_mismatch(message: str) -> str | None:
    """PyTorch's multi-line ``load_state_dict`` error -> one line naming the mismatching shapes and keys."""
    if "Error(s) in loading state_dict" not in message:
        return None
    shapes = re.findall(r"size mismatch for ([\w.]+): copying a param with shape torch.Size\((\[[^\]]*\])\) from "
                        r"checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)", message)  # fmt: skip
    parts = []
    if shapes:
        listed = ", ".join(f"{key}: {ckpt} in the checkpoint vs {model} here" for key, ckpt, model in shapes[:3])  # fmt: skip
        parts.append(f"shape mismatches ({len(shapes)}): {listed}{' ...' if len(shapes) > 3 else ''}")
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)")):  # fmt: skip
        found = re.search(pattern, message)
        if found:
            keys = re.findall(r'"([^"]+)"', found.group(1))
            parts.append(f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''} ({len(keys)} keys)")
    return ("the checkpoint does not fit this model's architecture: " + "; ".join(parts) +
            " (was it trained with another depth/width, or pruned? use the config that trained it)")  # fmt: skip


class DitlabArgumentParser(LightningArgumentParser):
    """Reports errors as one line instead of a usage dump."""

    def error(self, message: str, ex: Exception | None = None):  # noqa: D401
        raise UsageError(message)


class DitlabCLI(LightningCLI):
    """LightningCLI with ditlab's defaults: digits data, checkpoints that survive Ctrl-C, summary.json."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(NaNGuard, "nan_guard")  # always on; --nan_guard.max_bad_steps N

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Atomic checkpoint writes (unless the config chose a ``CheckpointIO``) and a progress bar counting steps."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        for index, callback in enumerate(trainer.callbacks):
            if type(callback) is RichProgressBar:  # Lightning's default; a config may name its own bar
                trainer.callbacks[index] = StepProgressBar()
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Lightning reads ``--ckpt_path``'s hyperparameters first. The file (or sharded folder, which Lightning's FSDP
        resume reads unchecked) is checked as plain data before anything reads it: ditlab's configs pass, anything
        else is refused in one line. An unreadable file is one line too, not a traceback."""
        import pickle
        import zipfile

        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path:
            check_checkpoint(path)
        try:
            super()._parse_ckpt_path()
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
            if "Weights only load failed" in str(error):  # trusted (DITLAB_TRUST_CHECKPOINTS): the full load reads it
                return
            raise ValueError(f"checkpoint {path} is truncated or corrupt and cannot be read ({type(error).__name__}); "
                             "use an earlier checkpoint such as last.ckpt") from None  # fmt: skip

    def before_fit(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunSummary):
                callback.config = config.clone().as_dict() if hasattr(config, "as_dict") else dict(config)


def build_cli(args: list[str] | None = None, run: bool = True) -> DitlabCLI:
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)  # configs say ${data.init_args.image_size}
    return DitlabCLI(
        DiffusionModule,
        L.LightningDataModule,  # any datamodule by class_path; the configs name theirs
        parser_class=DitlabArgumentParser,
        parser_kwargs={"parser_mode": "omegaconf+"},
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={  # what every shipped config shares; a config names only what its experiment sets
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 10,
            "enable_model_summary": False,
            "logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="ditlab", default_hp_metric=False),
            "callbacks": [
                ModelCheckpoint(save_last=True, every_n_train_steps=500, save_top_k=1),
                SaveOnInterrupt(),
                ResumeState(),
                LearningRateMonitor(logging_interval="step"),
                RunSummary(),
                TrainingMonitor(),
            ],
        },
        args=args,
        run=run,
    )


def full_help(argv: list[str]) -> int:
    """Trainer options, then every option of the model and data classes the config names (or the defaults)."""
    import yaml

    classes = {"model": "ditlab.methods.base.DiffusionModule", "data": "ditlab.data.digits.DigitsDataModule"}
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        config = yaml.safe_load(open(argv[argv.index("--config") + 1])) or {}
        for key in classes:
            classes[key] = (config.get(key) or {}).get("class_path", classes[key])
    for extra in ([], *([f"--{key}.help", name] for key, name in classes.items())):
        try:
            build_cli([argv[0], *(extra or ["--help"])], run=True)
        except SystemExit:
            pass
    return 0


QUIET = (r".*litlogger.*", r".*module\(s\) in eval mode.*", r".*`weights_only` was not set.*",
         r".*isinstance\(treespec, LeafSpec\).*", r".*does not have many workers.*")  # fmt: skip


def close_process_group() -> None:
    """Destroy the DDP/FSDP process group before the interpreter exits; left to exit-time destructors, gloo's
    threads can abort the process (``terminate called without an active exception``) after a finished run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no process closes its connections while another still talks to it
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in TOOLS:
            import importlib

            return importlib.import_module(TOOLS[argv[0]]).main(argv[1:]) or 0
        if argv and argv[0] in ("fit", "validate", "test", "predict") and {"-h", "--help"} & set(argv):
            return full_help(argv)
        try:
            build_cli(None if argv == sys.argv[1:] else argv)
        finally:
            close_process_group()
        return 0
    except SIGTERMException as stop:  # preempted: interrupted.ckpt is saved (SaveOnInterrupt)
        return stop.code if isinstance(stop.code, int) else 143
    except SystemExit as stop:  # Lightning ends a Ctrl-C'd run with exit(1) once interrupted.ckpt is saved
        if stop.code == 1 and isinstance(stop.__context__, KeyboardInterrupt):
            return 130
        raise
    except KeyboardInterrupt:  # Ctrl-C outside a Lightning run (start-up, a tool): the shell's code, no traceback
        print("ditlab: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, FileNotFoundError, IndexError, KeyError, RuntimeError) as error:
        message = str(error.args[0]) if error.args else type(error).__name__
        mismatch = state_dict_mismatch(message)
        if os.environ.get("DITLAB_DEBUG") or (isinstance(error, RuntimeError) and mismatch is None):
            raise
        if "Problems parsing config" in message and "--config" in argv:  # name the file YAML could not read
            configs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
            message = f"{message.splitlines()[0]} (in {', '.join(configs)}); check its YAML syntax"
        print(f"ditlab: error: {mismatch or condense(message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
