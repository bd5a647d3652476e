"""``ditlab --help`` answers at once: it lists every command without importing torch, Lightning or a method (they
load when a command runs). Checked through ``-X importtime``, never by timing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "lightning", "pytorch_lightning", "diffusers", "ditlab.methods", "ditlab.models", "ditlab.callbacks")


def imported(args: list[str]) -> tuple[str, set[str]]:
    """stdout of ``python -X importtime -m ditlab ARGS`` and every module it imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "ditlab", *args], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parent, env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return done.stdout, modules


def test_help_lists_every_command_without_importing_heavy_packages():
    out, modules = imported(["--help"])
    assert all(f"  {name} " in out for name in ("fit", "sample", "eval", "analyze", "convert", "encode", "export"))
    assert "ditlab.cli" in modules
    heavy = sorted(name for name in modules if name.split(".")[0] in HEAVY or name.startswith(HEAVY))
    assert not heavy, f"`ditlab --help` imports {heavy[:10]}"
