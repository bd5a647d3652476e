"""Families register through ``ditlab.plugins`` alone: a config naming a method's kind builds in a process that never
imported the method, and every family package imports on its own (no import cycle through the core)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(code: str) -> str:
    """``code`` in a fresh interpreter (nothing registered yet); its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_method_kind_builds_without_importing_its_family():
    code = ("import sys\nfrom ditlab.models.config import DiTConfig\n"
            "assert not [m for m in sys.modules if m.startswith('ditlab.methods.')]\n"
            "config = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=2, num_heads=2)\n"
            "print(type(DiTConfig(**config, mlp='moe').build().blocks[0].mlp).__name__)\n"
            "print(type(DiTConfig(**config, trunk='dydit').build().trunk).__name__)")  # fmt: skip
    assert run(code).split() == ["MoEFeedForward", "DyDiTTrunk"]


def test_every_family_package_imports_alone():
    from ditlab.plugins import family_packages

    packages = family_packages()
    assert "ditlab.methods.moe" in packages and "ditlab.methods.sampling.caches" in packages
    for name in packages:
        run(f"import {name}")
