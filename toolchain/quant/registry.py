"""Quantization methods registered by name: the registry below the ``quantize_`` verb (as torchao's).

A method is a class with a ``name``, a ``Params`` dataclass of its knobs (set from the config's
``params``; unknown keys are an error) and ``apply(model, config, ctx)``, which turns a float
model into a calibrated fake-quant model in place. The CLI lists whatever is registered, so new
methods need no CLI change.

Methods register themselves with ``@register_method`` when their module is imported. Nothing in
``toolchain.quant`` imports them: the modules to import are found through the installed package's
entry points (group ``quantface.methods`` in pyproject.toml; the built-ins are ``toolchain.methods``),
so a third-party package adds a method by declaring an entry point of its own.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
import json
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from toolchain.errors import ConfigError
from toolchain.quant.config import QuantConfig
from toolchain.quant.plugins import METHOD_GROUP, load_plugins


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

    def __init__(self, params: dict[str, Any] | None = None, labels: dict[str, str] | None = None):
        params = coerce_params(self, dict(params or {}), labels)
        try:
            self.params = self.Params(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid parameters for method '{self.name}': {exc}") from None

    @abstractmethod
    def apply(self, model: torch.nn.Module, config: QuantConfig, ctx: MethodContext) -> dict[str, Any]:
        """Quantize ``model`` in place; return a JSON-able summary of what was done."""


METHODS: dict[str, type[QuantMethod]] = {}


def _kind(tp: Any) -> tuple[str, Any, bool]:
    """(kind, element type, optional) of a Params field annotation: kind is int/float/bool/str/tuple/other."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            return "other", None, optional
        tp, origin = args[0], typing.get_origin(args[0])
    if origin in (tuple, list):
        elem = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return "tuple", elem[0] if elem else str, optional
    if tp in (int, float, bool, str):
        return tp.__name__, None, optional
    return "other", None, optional


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _coerce_scalar(kind: str, value: Any, raw: str | None) -> Any:
    """``value`` as ``kind``; raises ValueError with what was expected. ``raw`` is the text given on the
    command line (a ``str`` field keeps it as typed, e.g. ``--param path=007``)."""
    if kind == "str":
        if isinstance(value, str):
            return value
        if raw is not None and not isinstance(value, (list, dict)):
            return raw
        raise ValueError(_EXPECTED[kind])
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "yes", "on")
        raise ValueError(_EXPECTED[kind])
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError(_EXPECTED[kind])
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise ValueError(_EXPECTED[kind])
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(_EXPECTED[kind])
        if not math.isfinite(value):
            raise ValueError("a finite number")
        return float(value)
    return value


def coerce_params(method: "QuantMethod | type[QuantMethod]", params: dict[str, Any], labels: dict[str, str] | None = None,
                  raw: dict[str, str] | None = None) -> dict[str, Any]:
    """``params`` checked against ``method.Params``: unknown names and values of the wrong type are a
    ConfigError (``--param train_steps=abc: expected an integer``); returns the values converted to the
    field types (a tuple field as a JSON list). ``labels``: how to name a value in the error (default
    ``parameter 'NAME' = VALUE``); ``raw``: the text of command-line values (kept as is for str fields)."""
    allowed = {f.name for f in dataclasses.fields(method.Params)}
    unknown = set(params) - allowed
    if unknown:
        raise ConfigError(f"method '{method.name}' has no parameter(s) {', '.join(sorted(unknown))}; it accepts: {', '.join(sorted(allowed)) or 'none'}")
    try:
        hints = typing.get_type_hints(method.Params)
    except Exception:  # an annotation that cannot be resolved: leave the values to the dataclass
        return params
    out = {}
    for key, value in params.items():
        kind, elem, optional = _kind(hints.get(key))
        text = (raw or {}).get(key)
        label = (labels or {}).get(key) or f"parameter '{key}' = {json.dumps(value, default=str)}"
        try:
            if value is None or (text is not None and optional and text.strip().lower() in ("none", "null")):
                if not optional:
                    raise ValueError(_EXPECTED.get(kind, "a value") + ", not null")
                out[key] = None
            elif kind == "tuple":
                ekind = _kind(elem)[0]
                if isinstance(value, str):  # a comma-separated list on the command line
                    items = [v.strip() for v in value.split(",") if v.strip()]
                    parsed = []
                    for item in items:
                        try:
                            parsed.append(json.loads(item))
                        except json.JSONDecodeError:
                            parsed.append(item)
                    value, texts = parsed, items
                elif isinstance(value, (list, tuple)):
                    texts = [None] * len(value)
                else:
                    raise ValueError(f"a list of {_EXPECTED.get(ekind, 'values')[2:] if ekind != 'bool' else 'true/false'} values "
                                     "(JSON [..] or comma-separated)")
                try:
                    out[key] = [_coerce_scalar(ekind, v, t) for v, t in zip(value, texts)]
                except ValueError as exc:
                    raise ValueError(f"a list whose items are each {exc}") from None
            else:
                out[key] = _coerce_scalar(kind, value, text)
        except ValueError as exc:
            raise ConfigError(f"{label}: expected {exc}") from None
    return out


def register_method(cls: type[QuantMethod]) -> type[QuantMethod]:
    if cls.name in METHODS:
        raise ValueError(f"method '{cls.name}' registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, params: dict[str, Any] | None = None) -> QuantMethod:
    return method_class(name)(params)


def method_class(name: str) -> type[QuantMethod]:
    load_plugins(METHOD_GROUP)
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}' (available: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def registered_methods() -> dict[str, type[QuantMethod]]:
    """Every registered method by name (the built-ins and any installed plugin's), sorted by name."""
    load_plugins(METHOD_GROUP)
    return dict(sorted(METHODS.items()))


def param_defaults(name: str) -> dict[str, Any]:
    load_plugins(METHOD_GROUP)
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory()) for f in dataclasses.fields(METHODS[name].Params)}
