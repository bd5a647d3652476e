"""The layers hold: the core (``ditlab.models``, ``ditlab.diffusion``) imports nothing above it, and the sampler
core (``ditlab.diffusion``) not even the network, so the core stays pure PyTorch, importable into any training loop.

Checked twice: statically over every import statement of every core file (function-local ones and
``importlib.import_module("...")`` with a literal name included), and by importing the core's entry modules in a
fresh interpreter and reading ``sys.modules`` (which also catches a violation through a third module).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ditlab"
ABOVE_CORE = ("ditlab.methods", "ditlab.callbacks", "ditlab.metrics", "ditlab.data", "ditlab.tools", "ditlab.cli",
              "lightning", "pytorch_lightning")  # fmt: skip
RULES = {"ditlab.models": ABOVE_CORE, "ditlab.diffusion": (*ABOVE_CORE, "ditlab.models")}
ENTRY_MODULES = {
    "ditlab.models": ["ditlab.models", "ditlab.models.dit", "ditlab.models.taps", "ditlab.models.loading",
                      "ditlab.models.interop"],
    "ditlab.diffusion": ["ditlab.diffusion", "ditlab.diffusion.sample"],
}  # fmt: skip


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, module)`` of every import in the file at ``path``."""
    name = module_name(path)
    yield from source_imports(path.read_text(), name if path.name == "__init__.py" else name.rpartition(".")[0])


def source_imports(source: str, package: str) -> Iterator[tuple[int, str]]:
    """``(line, module)`` of every import in ``source`` of a module in ``package``; ``from a import b`` gives ``a``
    and ``a.b``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
            yield node.lineno, base
            yield from ((node.lineno, f"{base}.{alias.name}") for alias in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):  # fmt: skip
            yield node.lineno, node.args[0].value


def test_core_files_import_nothing_above_their_layer():
    violations = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
                  for layer, forbidden in RULES.items()
                  for path in sorted((PACKAGE / layer.split(".")[1]).rglob("*.py"))
                  for line, name in imports(path) if within(name, forbidden)]  # fmt: skip
    assert not violations, "the core imports a higher layer:\n" + "\n".join(violations)


def test_the_checker_sees_every_form_of_import():
    """A function-local import, a relative one, ``from ditlab import x`` and ``import_module`` are all seen."""
    assert "ditlab.models.dit" in {name for _, name in imports(PACKAGE / "models" / "__init__.py")}
    source = ("def f():\n    from ..methods import moe\n    from ditlab import callbacks\n"
              "    importlib.import_module('lightning.pytorch')\n")  # fmt: skip
    names = {name for _, name in source_imports(source, "ditlab.models")}
    assert {"ditlab.methods.moe", "ditlab.callbacks", "lightning.pytorch"} <= names


@pytest.mark.parametrize("layer", list(ENTRY_MODULES))
def test_importing_the_core_loads_nothing_above_it(layer):
    """A fresh interpreter imports the layer's entry modules; ``sys.modules`` must hold nothing forbidden."""
    code = (f"import importlib, json, sys\nfor name in {ENTRY_MODULES[layer]!r}:\n    importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = [name for name in json.loads(done.stdout.splitlines()[-1]) if within(name, RULES[layer])]
    assert not loaded, f"importing {ENTRY_MODULES[layer]} loads {loaded}"
