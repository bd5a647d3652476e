"""The ditlab tools as typed functions under jsonargparse, the machinery LightningCLI gives ``ditlab fit``.

Each tool is a plain function (``ditlab.tools.sample.sample``, ...) whose signature and docstring are its command
line: jsonargparse turns every parameter into an option with its type, default and help, validates values, and
reads ``--config FILE`` (``--print_config`` writes one), the way litgpt builds its CLI from function signatures
(``jsonargparse.auto_cli``). A ``sampling: SamplingConfig`` parameter is the one sampling argument every tool
shares (sampler, steps, guidance, time grid, SDE, tolerances, feature cache); its options sit at the top level
(``--steps 50 --cache fora --cache.interval 2``) and default to the settings recorded in ``--ckpt``.

Spellings accepted besides jsonargparse's own: dashes for underscores (``--cfg-scale``), a bare boolean flag
(``--flip`` = ``--flip true``, ``--no-ema`` = ``--ema false``), a tool's first argument as its positional
parameter (``ditlab encode SOURCE``), ``--cache POLICY`` (= ``--cache.policy POLICY`` with that policy's default
knobs; ``--cache plan:PATH`` also sets ``--cache.path``), comma-separated cache lists
(``--cache.coefficients 1,-2,0.5``) and a tool's aliases (``--class`` for ``--label``). The ``--cache.KNOB``
options are the registered policies' knobs (``ditlab.tools.cache_options``); ``--cache.KNOB V`` sets
``sampling.cache.options.KNOB``.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from ditlab.diffusion.config import CacheConfig, SamplingConfig
from ditlab.tools import TOOLS
from ditlab.tools.cache_options import cache_arguments, cache_config, flat_cache, list_knobs

SAMPLING_NOTE = ("Sampling options (sampler, steps, guidance, time grid, SDE, feature cache) default to what the "
                 "checkpoint recorded: give --ckpt with --help to see them")  # fmt: skip




class ToolParser(ArgumentParser):
    """Parse errors become a :class:`ditlab.cli.UsageError` (one line), not a usage dump and ``exit(2)``; an option
    must be spelt in full (``--step`` is not taken for ``--steps``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str, ex: Exception | None = None):  # noqa: D401
        from ditlab.cli import UsageError

        raise UsageError(message, command=self.prog)


def boolean(hint) -> bool:
    """``bool`` or ``bool | None``."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return hint is bool or (union and set(typing.get_args(hint)) <= {bool, type(None)})


def takes_sampling(function: Callable) -> bool:
    return "sampling" in inspect.signature(function).parameters


def build_parser(name: str, defaults: SamplingConfig | None = None) -> ToolParser:
    """The parser of tool ``name``: its function's parameters, plus the shared sampling options at the top level
    (defaulting to ``defaults``, the checkpoint's recorded settings, when given)."""
    tool = TOOLS[name]
    function = tool.function()
    doc = inspect.getdoc(function) or ""
    description = doc.split("\n\nArgs:")[0]
    if takes_sampling(function):
        description += f"\n\n{SAMPLING_NOTE}."
    parser = ToolParser(prog=f"ditlab {name}", description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    parser.add_function_arguments(function, skip={"sampling"}, as_group=False, as_positional=False)
    if takes_sampling(function):
        parser.add_class_arguments(SamplingConfig, None, as_group=True, skip={"cache"})
        parser.add_class_arguments(cache_arguments(), "cache", as_group=True)
        for action in parser._actions:  # `--cache POLICY` is rewritten to --cache.policy (see normalise)
            if action.dest == "cache":
                action.metavar, action.help = "POLICY", "a policy (its knobs at their defaults), or a YAML file"
        if defaults is not None:
            parser.set_defaults(flat_defaults(defaults))
    return parser


def flat_defaults(sampling: SamplingConfig) -> dict:
    """``{"steps": 50, "cache.policy": "fora", "sde.norm": 1.0, ...}``: a SamplingConfig as parser defaults."""
    flat = {}
    for item in fields(sampling):
        value = getattr(sampling, item.name)
        if isinstance(value, CacheConfig):
            flat.update(flat_cache(value))
        elif is_dataclass(value):
            flat.update({f"{item.name}.{sub.name}": getattr(value, sub.name) for sub in fields(value)})
        else:
            flat[item.name] = list(value) if isinstance(value, tuple) else value
    return flat


def recorded_sampling(path: str) -> SamplingConfig | None:
    """The sampling settings a ditlab checkpoint recorded (None for anything else: the tool's own reading reports
    it). Only the metadata is read: a single file is memory-mapped, a sharded folder is read without its tensors."""
    from ditlab.checkpoint import run_settings
    from ditlab.models.loading import (
        UntrustedCheckpointError,
        load_plain,
        read_checkpoint,
        read_sharded_checkpoint,
    )

    source = Path(path)
    if source.is_dir() and (source / ".metadata").is_file():
        checkpoint = read_sharded_checkpoint(source, tensors=False)
    elif source.is_file():
        try:
            checkpoint = load_plain(source, f"checkpoint {source}", map_location="cpu", mmap=True)
        except UntrustedCheckpointError:
            raise
        except Exception:  # not a zip-format file (legacy, truncated): the full read explains it in one line
            checkpoint = read_checkpoint(source)
    else:
        read_checkpoint(source)  # the one-line "does not exist"
        return None
    meta = checkpoint.get("ditlab") if isinstance(checkpoint, dict) else None
    if meta is None and source.is_dir():  # not among a sharded folder's plain entries: read it whole
        meta = read_checkpoint(source).get("ditlab")
    return run_settings(meta)[1] if isinstance(meta, dict) else None


def option_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` / ``--name=VALUE`` in ``argv`` (the last one), else None."""
    value = None
    for index, arg in enumerate(argv):
        if arg == f"--{name}" and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def config_value(argv: list[str], name: str) -> str | None:
    """``name`` as set by the ``--config FILE`` files in ``argv`` (the last one that sets it), else None."""
    import yaml

    value = None
    for index, arg in enumerate(argv[:-1]):
        if arg == "--config" and Path(argv[index + 1]).is_file():
            loaded = yaml.safe_load(Path(argv[index + 1]).read_text())
            if isinstance(loaded, dict) and loaded.get(name) is not None:
                value = str(loaded[name])
    return value


def normalise(name: str, argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` in jsonargparse's spelling (see the module docstring); also whether ``--cache POLICY`` was given,
    which starts the cache from that policy's defaults instead of the checkpoint's knobs."""
    tool = TOOLS[name]
    function = tool.function()
    hints = typing.get_type_hints(function)
    flags = {key for key, hint in hints.items() if boolean(hint) and key != "return"}
    if takes_sampling(function):
        flags |= {key for key, hint in typing.get_type_hints(SamplingConfig).items() if boolean(hint)}
    argv = list(argv)
    if tool.positional and argv and not argv[0].startswith("-"):
        argv = [f"--{tool.positional}", *argv]
    out, fresh_cache, index = [], False, 0
    while index < len(argv):
        arg = argv[index]
        if not arg.startswith("--") or arg == "--":
            out.append(arg)
            index += 1
            continue
        key, equals, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        key = tool.aliases.get(key, key)
        following = argv[index + 1] if index + 1 < len(argv) else None
        bare = not equals and (following is None or following.startswith("--"))
        if bare and key in flags:
            out += [f"--{key}", "true"]
        elif bare and key.startswith("no_") and key[3:] in flags:
            out += [f"--{key[3:]}", "false"]
        elif key == "cache" and takes_sampling(function):
            policy = value if equals else following
            if policy is None or Path(policy).is_file() or policy.lstrip().startswith("{"):  # a file, inline YAML
                out += ["--cache", policy] if policy is not None else ["--cache"]
            elif ":" in policy:  # `plan:PATH`
                name, _, path = policy.partition(":")
                out += ["--cache.policy", name, "--cache.path", path]
                fresh_cache = True
            else:
                out += ["--cache.policy", policy]
                fresh_cache = True
            index += 0 if equals else 1
        elif (key.startswith("cache.") and key in list_knobs()  # (only a cache knob loads the policies)
              and not (value if equals else following or "[").lstrip().startswith(("[", "--"))):
            out += [f"--{key}", f"[{value if equals else following}]"]  # `--cache.coefficients 1,2,3`
            index += 0 if equals else 1
        else:
            out.append(f"--{key}{equals}{value}")
        index += 1
    return out, fresh_cache


def run_tool(name: str, argv: list[str]) -> int:
    """Parse ``argv`` for tool ``name``, call its function, return its exit code (0 for ``--help``)."""
    argv, fresh_cache = normalise(name, argv)
    function = TOOLS[name].function()
    defaults = None
    wants_help = any(arg in ("-h", "--help") for arg in argv)
    if takes_sampling(function):
        ckpt = option_value(argv, "ckpt") or config_value(argv, "ckpt")
        try:
            defaults = recorded_sampling(ckpt) if ckpt else None
        except Exception:
            if not wants_help:
                raise
        if defaults is not None and fresh_cache:
            defaults.cache = CacheConfig()
    parser = build_parser(name, defaults)
    try:
        config = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --print_config
        return stop.code if isinstance(stop.code, int) else 0
    values = parser.instantiate(config)
    values.pop("config", None)
    kwargs = {key: values[key] for key in inspect.signature(function).parameters if key != "sampling"}
    if takes_sampling(function):
        kwargs["sampling"] = sampling_from(values)
    return function(**kwargs) or 0


def sampling_from(values) -> SamplingConfig:
    """The :class:`SamplingConfig` of the parsed (and instantiated) top-level sampling options."""
    options = {item.name: values[item.name] for item in fields(SamplingConfig)}
    options["cache"] = cache_config(options["cache"])
    if not is_dataclass(options["sde"]):
        options["sde"] = dict(vars(options["sde"])) if hasattr(options["sde"], "__dict__") else options["sde"]
    return SamplingConfig(**options)

