"""The ``ditlab`` command: LightningCLI (OmegaConf mode) for fit/validate/test/predict, plus tools.

``ditlab fit --config configs/dit.yaml [--trainer.max_steps 100 ...]`` trains; the tools (``ditlab sample``,
``eval``, ``analyze``, ``convert``, ``encode``) are typed functions under the same jsonargparse machinery
(``ditlab.tools.command``); ``ditlab --help`` lists every command. Progress is a step bar in a
terminal and a plain line every few steps otherwise (a batch log). ``--trainer.default_root_dir DIR`` puts the
run's logs, checkpoints and summary.json under DIR. Config fragments (``configs/data/*.yaml``,
``configs/trainer/*.yaml``) are accepted by ``--config FILE`` and by ``--data FILE`` / ``--trainer FILE``.
Lightning's advertisement and known-harmless notices are filtered (``--verbose`` or ``DITLAB_DEBUG=1`` shows them).
Bad input (a config, a file, missing weights) ends in one line that names the key or file and the fix, with
exit code 2 (``DITLAB_DEBUG=1`` for the full traceback), and so does a full disk (``ditlab.atomic``: the file, the
space it needed, what is already saved); anything else is a bug and keeps its traceback. Ctrl-C (SIGINT) or SIGTERM stop a
run after saving ``interrupted.ckpt``, with the shell's exit codes 130 / 143; a child run ditlab starts (the teacher
build) is stopped with it. Checkpoints are read as plain data only; ``DITLAB_TRUST_CHECKPOINTS=1`` reads a file
you trust fully (``ditlab.models.loading``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path

from ditlab.atomic import disk_full, quiet_writer_threads
from ditlab.child_process import RECEIVED, noting_sigint
from ditlab.threads import pop_threads_option, set_threads
from ditlab.tools import TOOLS

LIGHTNING_COMMANDS = {  # what `ditlab --help` lists, one line each; the tools' lines are their own summaries
    "fit": "train a config (configs/*.yaml): DiT/SiT, dicomp, REPA, HASTE, ...",
    "validate": "run the validation loop of a config on a checkpoint (--ckpt_path)",
    "test": "run the test loop of a config on a checkpoint (--ckpt_path)",
    "predict": "run the predict loop of a config on a checkpoint (--ckpt_path)",
}
COMMANDS = {**LIGHTNING_COMMANDS, **{name: tool.summary for name, tool in TOOLS.items()}}
CONFIG_KEYS = ("trainer", "model", "data", "seed_everything", "optimizer", "lr_scheduler", "ckpt_path", "nan_guard")


class UsageError(Exception):
    """Bad input from the command line or a config file; reported in one line, with ``command`` named for its
    ``--help``."""

    def __init__(self, message: str, command: str = "ditlab fit") -> None:
        super().__init__(message)
        self.command = command


def condense(message: str, command: str = "ditlab fit") -> str:
    """jsonargparse's nested, multi-line validation messages -> the one line a user needs."""
    text = str(message)
    listing = f"; run `{command} --help` to list the valid keys"
    unknown = re.search(r"unrecognized arguments: (\S+)", text, re.IGNORECASE)
    if unknown:
        return f"unknown option {unknown.group(1)}{listing}"
    required = re.search(r"the following arguments are required: (.+)", text)
    if required:
        names = ", ".join(f"--{name.strip().lstrip('-')}" for name in required.group(1).split(","))
        return f"missing {names}; run `{command} --help` for what each option means"
    keys = re.findall(r'Parser key "([^"]+)"', text)
    noise = ("Does not validate", "Subtypes", "Errors:", "Given value", "Expected a <class 'NoneType'>")
    details = []
    for piece in re.split(r"\n| - ", text):
        piece = re.sub(r"^-\s+", "", re.sub(r'Parser key "[^"]+":\s*', "", piece).strip()).strip()
        if piece and not piece.startswith(noise):
            details.append(re.sub(r"<class '([\w.]+)'>", r"\1", piece))
    detail = details[0] if details else text.splitlines()[0]
    given = re.search(r"Given value: (.+)", text)
    if given and detail.startswith("Expected a"):  # "Expected a int" -> "expected int, got 'many'"
        detail = f"expected {detail[len('Expected a '):].strip()}, got {given.group(1).strip()!r}"
    where = ".".join(key for key in keys if key != "config")
    hint = listing if "not accepted" in detail else ""
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


def __getattr__(name: str):
    """The ``fit`` side (``build_cli``, ``DitlabCLI``, ...) lives in :mod:`ditlab.lightning_cli`, imported on first use
    so that ``ditlab --help`` and the tools start without Lightning."""
    if name in ("DitlabArgumentParser", "DitlabCLI", "build_cli", "full_help"):
        from ditlab import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sigterm_exception() -> type[BaseException] | tuple[()]:
    """Lightning's ``SIGTERMException`` once Lightning is loaded (only a Lightning run raises it), else nothing to
    catch, so reporting a tool's error does not import Lightning."""
    module = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return module.SIGTERMException if module is not None else ()


QUIET = (r".*litlogger.*", r".*module\(s\) in eval mode.*", r".*`weights_only` was not set.*",
         r".*isinstance\(treespec, LeafSpec\).*", r".*does not have many workers.*")  # fmt: skip


class QuietFilter(logging.Filter):
    """Drops Lightning's log records that match :data:`QUIET` (its litlogger tip, the ``weights_only`` notice)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(re.match(pattern, message, re.DOTALL) for pattern in QUIET)


def quiet_lightning() -> None:
    """Filter the known-harmless warnings and Lightning notices for this process (and the ``ditlab fit`` children
    it starts, which run this too); ``--verbose`` / ``DITLAB_DEBUG=1`` skip it."""
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "lightning.pytorch.trainer.connectors.checkpoint_connector"):
        target = logging.getLogger(name)
        if not any(isinstance(existing, QuietFilter) for existing in target.filters):
            target.addFilter(QuietFilter())


def top_help() -> str:
    """``ditlab --help``: every command with one line."""
    width = max(map(len, COMMANDS))
    lines = ["usage: ditlab COMMAND [options]   (ditlab COMMAND --help lists a command's options)", "",
             "commands:", *(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()), "",
             "global options:", "  --verbose    show every Lightning notice and warning (also DITLAB_DEBUG=1)",
             "  --threads N  torch threads (default: OMP_NUM_THREADS, else the cores free now)",
             "  --version    the installed ditlab version",
             "  --print_completion bash|zsh|tcsh   a shell completion script (needs shtab; see ditlab.tools.completion)"]  # fmt: skip
    return "\n".join(lines)


def fragment_keys(path: str) -> list[str] | None:
    """The top-level keys of a YAML config file, or None when ``path`` is not a readable YAML mapping."""
    import yaml

    if not path.endswith((".yaml", ".yml")) or not Path(path).is_file():
        return None
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError:
        return None  # the parser reports the syntax error with its position
    return list(loaded) if isinstance(loaded, dict) else None


def place_fragments(argv: list[str]) -> list[str]:
    """Config fragments work both ways. ``--data FILE`` (or ``--trainer``/``--model``) whose FILE wraps its options
    in a top-level ``data:`` key becomes ``--config FILE`` at the same place; a bare fragment (``class_path:`` at
    the top) is left to the group option. A file given where it does not fit is one line naming the fix."""
    placed, index = [], 0
    while index < len(argv):
        arg = argv[index]
        flag, _, value = arg.partition("=")
        group = flag[2:] if flag in ("--data", "--trainer", "--model", "--config") else None
        if group and not value and index + 1 < len(argv):
            value, index = argv[index + 1], index + 1
        keys = fragment_keys(value) if group else None
        if keys is None:
            placed.extend([flag, value] if group and "=" not in arg else [arg])
        elif group == "config":
            if not set(keys) & set(CONFIG_KEYS) and keys:
                kind = "a trainer" if set(keys) & {"accelerator", "devices", "max_steps", "strategy", "precision"} \
                    else "a bare class" if "class_path" in keys else "an unknown"  # fmt: skip
                raise UsageError(f"{value} is {kind} fragment with top-level keys {keys[:4]}, not a config (whose "
                                 f"top-level keys are {', '.join(CONFIG_KEYS[:3])}); nest it under the key it belongs "
                                 "to, or give it as --data FILE / --trainer FILE / --model FILE")  # fmt: skip
            placed.extend(["--config", value])
        elif keys == [group]:
            placed.extend(["--config", value])
        elif len(keys) == 1 and keys[0] in CONFIG_KEYS:
            raise UsageError(f"{value} holds {keys[0]} options (top-level key {keys[0]}:), not {group} options; give it "
                             f"as --{keys[0]} {value} or --config {value}")  # fmt: skip
        elif set(keys) & set(CONFIG_KEYS):
            raise UsageError(f"{value} is a whole config (top-level keys {keys}); give it as --config {value}")
        else:
            placed.extend([f"--{group}", value])
        index += 1
    return placed


def close_process_group() -> None:
    """Destroy the DDP/FSDP process group before the interpreter exits; left to exit-time destructors, gloo's
    threads can abort the process (``terminate called without an active exception``) after a finished run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no process closes its connections while another still talks to it
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """``ditlab ARGS``; returns the exit code. A user's Ctrl-C (a real SIGINT, noted) ends in one line and 130, a
    SIGTERM in 143, both after ``interrupted.ckpt`` is saved; a ``KeyboardInterrupt`` raised by code keeps its
    traceback."""
    with noting_sigint():
        return run_command(argv)


USER_ERRORS = (UsageError, ValueError, FileNotFoundError)
REPORT = ("ditlab: this is not a known user error and may be a bug in ditlab; please report it with the command "
          "and the traceback above")  # fmt: skip


def run_command(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or bool(os.environ.get("DITLAB_DEBUG"))
    argv = [arg for arg in argv if arg != "--verbose"]
    if not verbose:
        quiet_lightning()
    quiet_writer_threads()  # TensorBoard's thread would print its own out-of-space traceback
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(top_help())
            return 0 if argv else 2
        if argv[0] in ("-V", "--version"):
            from importlib.metadata import version

            print(f"ditlab {version('ditlab')}")
            return 0
        argv, threads = pop_threads_option(argv)
        if argv and (argv[0] in TOOLS or argv[0] in ("fit", "validate", "test", "predict")):
            set_threads(threads)  # summary.json records the choice (threads, cores, load)
        if argv[0] in TOOLS:
            from ditlab.tools.command import run_tool

            return run_tool(argv[0], argv[1:])
        if argv[0].partition("=")[0] == "--print_completion":
            from ditlab.tools.completion import completion_script

            shell = argv[0].partition("=")[2] or (argv[1] if len(argv) > 1 else "bash")
            print(completion_script(shell))
            return 0
        argv = place_fragments(argv)
        from ditlab.lightning_cli import build_cli, full_help

        if argv[0] in ("fit", "validate", "test", "predict") and {"-h", "--help"} & set(argv):
            return full_help(argv)
        if from_command_line:  # LightningCLI warns when given args while sys.argv has some too
            sys.argv[1:] = argv
        try:
            build_cli(None if from_command_line else argv)
        finally:
            close_process_group()
        return 0
    except sigterm_exception() as stop:  # preempted: interrupted.ckpt is saved (SaveOnInterrupt)
        return stop.code if isinstance(stop.code, int) else 143
    except SystemExit as stop:  # Lightning ends a Ctrl-C'd run with exit(1) once interrupted.ckpt is saved
        if stop.code == 1 and isinstance(stop.__context__, KeyboardInterrupt) and signal.SIGINT in RECEIVED:
            return 130
        raise
    except KeyboardInterrupt:  # Ctrl-C outside a Lightning run (start-up, a tool): the shell's code, no traceback
        if signal.SIGINT not in RECEIVED:
            raise
        print("ditlab: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except Exception as error:
        full = disk_full(error)  # out of space or quota, whatever was writing: the file, the sizes, what is saved
        if full is not None and not os.environ.get("DITLAB_DEBUG"):
            print(f"ditlab: error: {full}", file=sys.stderr)
            return 2
        message = str(error.args[0]) if error.args else type(error).__name__
        mismatch = state_dict_mismatch(message) if isinstance(error, RuntimeError) else None
        if os.environ.get("DITLAB_DEBUG") or not (isinstance(error, USER_ERRORS) or mismatch):
            if not isinstance(error, USER_ERRORS) and full is None:
                if hasattr(error, "add_note"):
                    error.add_note(REPORT)  # printed under the traceback (Python >= 3.11)
                else:
                    print(REPORT.replace("above", "below"), file=sys.stderr)
            raise
        if "Problems parsing config" in message and "--config" in argv:  # name the file YAML could not read
            configs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
            message = f"{message.splitlines()[0]} (in {', '.join(configs)}); check its YAML syntax"
        line = mismatch or condense(message, getattr(error, "command", "ditlab fit"))
        print(f"ditlab: error: {line}{config_file_of(line, argv)}", file=sys.stderr)
        return 2


def config_file_of(line: str, argv: list[str]) -> str:
    """`` (in FILE, at model.init_args.lrr)`` when the key a one-line error names was set in a ``--config`` file."""
    import yaml

    named = re.search(r"Option '([^']+)' is not accepted", line)
    if named is None:
        return ""
    key = named.group(1).split(".")[-1]
    files = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    files += [arg.partition("=")[2] for arg in argv if arg.startswith("--config=")]

    def find(node, path: list[str]) -> str | None:
        if isinstance(node, dict):
            for name, value in node.items():
                found = ".".join([*path, str(name)]) if name == key else find(value, [*path, str(name)])
                if found:
                    return found
        return None

    for path in files:
        try:
            found = find(yaml.safe_load(Path(path).read_text()), [])
        except (OSError, yaml.YAMLError):
            continue
        if found:
            return f" (in {path}, at {found})"
    return ""


if __name__ == "__main__":
    sys.exit(main())
