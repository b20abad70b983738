"""Registry of pluggable parts of a quantized layer (input transforms, low-rank branches).

Each part's ``describe()`` returns a dict with a ``type`` key; the checkpoint loader looks the
type up here to rebuild an empty part of the right shape before loading the state dict. New
techniques register their parts without touching the checkpoint code.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from toolchain.errors import CheckpointError
from toolchain.quant.plugins import COMPONENT_GROUP, load_plugins

Builder = Callable[[dict[str, Any], nn.Module], nn.Module]
_BUILDERS: dict[str, Builder] = {}


def register_component(type_name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        _BUILDERS[type_name] = fn
        return fn

    return deco


def build_component(desc: dict[str, Any], layer: nn.Module) -> nn.Module:
    _ensure_registered()
    kind = desc.get("type")
    if kind not in _BUILDERS:
        raise CheckpointError(f"checkpoint uses layer component '{kind}', which this toolchain version does not know")
    return _BUILDERS[kind](desc, layer)


def _ensure_registered() -> None:
    # Importing the modules that define parts (entry points, toolchain.quant.plugins) registers their builders.
    load_plugins(COMPONENT_GROUP)
