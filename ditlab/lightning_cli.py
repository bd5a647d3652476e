"""``ditlab fit`` / ``validate`` / ``test`` / ``predict``: LightningCLI (OmegaConf mode) with ditlab's defaults.

Apart from :mod:`ditlab.cli` (the command dispatcher) so that ``ditlab --help`` and the tools start without
importing Lightning, the callbacks or the method modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from jsonargparse import lazy_instance, set_parsing_settings
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ditlab.callbacks.eval_options import EvalOptions
from ditlab.callbacks.interrupt import SaveOnInterrupt
from ditlab.callbacks.monitor import LineProgress, StepProgressBar, TrainingMonitor
from ditlab.callbacks.reliability import NaNGuard, ResumeState
from ditlab.callbacks.summary import RunSummary
from ditlab.checkpoint_io import AtomicCheckpointIO
from ditlab.cli import UsageError
from ditlab.methods.base import DiffusionModule
from ditlab.models.loading import check_checkpoint, read_checkpoint

DEFAULT_SAVE_DIR = "runs"  # the default logger's save_dir; it follows --trainer.default_root_dir


class DitlabArgumentParser(LightningArgumentParser):
    """Reports errors as one line instead of a usage dump, and takes options spelt in full only (argparse would read
    ``--trainer.max_step 20`` as ``--trainer.max_steps 20``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str, ex: Exception | None = None):  # noqa: D401
        raise UsageError(message)


class DitlabCLI(LightningCLI):
    """LightningCLI with ditlab's defaults: digits data, checkpoints that survive Ctrl-C, summary.json."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(NaNGuard, "nan_guard")  # always on; --nan_guard.max_bad_steps N
        parser.add_lightning_class_args(EvalOptions, "eval")  # a quick look: --eval.num_samples N --eval.steps N

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Atomic checkpoint writes (unless the config chose a ``CheckpointIO``) and a progress bar counting steps."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        for index, callback in enumerate(trainer.callbacks):
            if type(callback) is RichProgressBar:  # Lightning's default; a config may name its own bar
                trainer.callbacks[index] = StepProgressBar() if sys.stdout.isatty() else LineProgress()
        return trainer

    def before_instantiate_classes(self) -> None:
        """``--trainer.default_root_dir DIR`` moves the whole run: a logger left at the default ``save_dir``
        (``runs``) logs under DIR instead, and checkpoints and summary.json follow the logger. A ``save_dir``
        the user set to anything else is kept."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = config.get("trainer") if config is not None else None
        root = trainer.get("default_root_dir") if trainer is not None else None
        if not root:
            return
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and str(getattr(init_args, "save_dir", "")) == DEFAULT_SAVE_DIR:
                init_args.save_dir = str(root)

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path``'s hyperparameters update the config, as in Lightning, but the file is read as plain data
        (ditlab's configs pass, anything else is refused in one line; a sharded folder, which Lightning's FSDP resume
        reads unchecked, is checked too), an unreadable file is one line, and a checkpoint saved outside the CLI
        (no ``_class_path``) leaves the config as given."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path:
            return
        check_checkpoint(path)
        if not Path(path).is_file():  # a sharded folder, "last", or a missing file that the resume reports
            return
        checkpoint = read_checkpoint(path)
        if "pytorch-lightning_version" not in checkpoint:  # a bare torch.save: Lightning's resume fails on KeyError
            raise ValueError(f"--ckpt_path {path} is not a Lightning checkpoint (a plain torch.save file?); --ckpt_path "
                             "resumes a run from a .ckpt that `ditlab fit` wrote (runs/<name>/version_N/checkpoints/"
                             "last.ckpt)")  # fmt: skip
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if "_class_path" not in hparams:
            return
        model = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

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
            "logger": lazy_instance(TensorBoardLogger, save_dir=DEFAULT_SAVE_DIR, name="ditlab",
                                    default_hp_metric=False),
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
