"""Quantization methods registered by name.

A method is a class with a ``name``, a ``Params`` dataclass of its knobs (set from the config's
``params``; unknown keys are an error) and ``apply(model, config, ctx)``, which turns a float
model into a calibrated fake-quant model in place. The CLI lists whatever is registered, so new
methods need no CLI change.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from toolchain.errors import ConfigError
from toolchain.quant.config import QuantConfig


@dataclass
class MethodContext:
    """What a method may use besides the model: calibration batches and a place for state."""

    lq_batches: list[torch.Tensor]
    workdir: Path | None = None  # resumable state (observer stats, training checkpoints)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    log: Callable[[str], None] = print

    def state_dir(self, stage: str) -> Path | None:
        return self.workdir / stage if self.workdir is not None else None


@dataclass
class NoParams:
    pass


class QuantMethod(ABC):
    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    summary_doc: ClassVar[str] = ""

    def __init__(self, params: dict[str, Any] | None = None):
        params = dict(params or {})
        allowed = {f.name for f in dataclasses.fields(self.Params)}
        unknown = set(params) - allowed
        if unknown:
            raise ConfigError(f"method '{self.name}' has no parameter(s) {', '.join(sorted(unknown))}; it accepts: {', '.join(sorted(allowed)) or 'none'}")
        try:
            self.params = self.Params(**params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid parameters for method '{self.name}': {exc}") from None

    @abstractmethod
    def apply(self, model: torch.nn.Module, config: QuantConfig, ctx: MethodContext) -> dict[str, Any]:
        """Quantize ``model`` in place; return a JSON-able summary of what was done."""


METHODS: dict[str, type[QuantMethod]] = {}


def register_method(cls: type[QuantMethod]) -> type[QuantMethod]:
    if cls.name in METHODS:
        raise ValueError(f"method '{cls.name}' registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, params: dict[str, Any] | None = None) -> QuantMethod:
    import toolchain.methods  # noqa: F401  (registers the built-in methods)

    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}' (available: {', '.join(sorted(METHODS))})")
    return METHODS[name](params)


def param_defaults(name: str) -> dict[str, Any]:
    import toolchain.methods  # noqa: F401

    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory()) for f in dataclasses.fields(METHODS[name].Params)}
