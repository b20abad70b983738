"""Entry-point discovery of the modules that register quantization methods and layer components.

``toolchain.quant`` holds the registries (``registry.METHODS``, ``components``) but never imports the
modules that fill them — those sit above it (``toolchain.methods``, ``toolchain.balance``,
``toolchain.lowrank``). They are named as entry points of the installed distribution instead
(pyproject.toml, ``[project.entry-points."quantface.methods"]`` and ``"quantface.components"``); loading
an entry point imports its module, whose decorators register what it defines. Other packages can
add methods or components the same way.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from toolchain.errors import ConfigError

METHOD_GROUP = "quantface.methods"
COMPONENT_GROUP = "quantface.components"
_LOADED: set[str] = set()


def load_plugins(group: str) -> list[str]:
    """Import every module named by an entry point of ``group`` (once per process); returns their names.

    Raises ConfigError when the group has no entry point at all, i.e. the toolchain is run from a source
    tree that was never installed (``pip install -e .`` writes the entry points).
    """
    eps = list(entry_points(group=group))
    if not eps:
        raise ConfigError(f"no '{group}' entry points found: install the toolchain (pip install -e . in the repository) "
                          "so that its methods and layer components can be found")
    names = []
    for ep in eps:
        if ep.value not in _LOADED:
            ep.load()
            _LOADED.add(ep.value)
        names.append(ep.value)
    return names
