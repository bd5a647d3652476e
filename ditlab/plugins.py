"""Where registered kinds come from: method families and third-party packages fill the core's registries.

The core's registries (block components and trunks in ``ditlab.models.components``, cache policies and other
model-function wrappers in ``ditlab.diffusion``) start with the core's own kinds. A method family registers its
kinds when its package is imported; :func:`load_plugins` imports every family package of ``ditlab.methods`` and
every module a third-party distribution names under the ``ditlab.plugins`` entry-point group::

    [project.entry-points."ditlab.plugins"]
    my_policies = "my_package.ditlab_policies"   # imported once, registers its kinds

A registry that is asked for a name it does not know calls :func:`load_plugins` once before refusing, so a
config or checkpoint naming any installed kind builds without the caller importing its family first, while
``import ditlab.models`` alone stays pure PyTorch and fast.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

GROUP = "ditlab.plugins"
_loaded = False


def family_packages() -> list[str]:
    """Every package under ``ditlab.methods`` (families and the families nested in ``methods/sampling``)."""
    import ditlab.methods

    return sorted(info.name for info in pkgutil.walk_packages(ditlab.methods.__path__, "ditlab.methods.")
                  if info.ispkg)  # fmt: skip


def load_plugins() -> None:
    """Import ditlab's method families and the ``ditlab.plugins`` entry points (once per process)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in family_packages():
        importlib.import_module(name)
    for entry in entry_points(group=GROUP):
        entry.load()
