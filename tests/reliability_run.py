"""``ditlab`` as a subprocess for the kill tests: prints ``step N`` after every optimiser step."""

from __future__ import annotations

import sys

import lightning as L

from ditlab import cli
from ditlab import lightning_cli as fit_cli


class PrintStep(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        print(f"step {trainer.global_step}", flush=True)


if __name__ == "__main__":
    original = fit_cli.build_cli

    def build_with_printer(args=None, run=True):
        """The real CLI, plus a step printer the test waits on."""
        import lightning.pytorch.cli as lightning_cli

        init = lightning_cli.LightningCLI.instantiate_trainer

        def instantiate_trainer(self, **kwargs):
            trainer = init(self, **kwargs)
            trainer.callbacks.insert(0, PrintStep())
            return trainer

        lightning_cli.LightningCLI.instantiate_trainer = instantiate_trainer
        return original(args, run)

    fit_cli.build_cli = build_with_printer  # cli.main imports it from ditlab.lightning_cli when fit runs
    sys.exit(cli.main(sys.argv[1:]))
