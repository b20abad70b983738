"""Serialisable quantization configs.

A QuantConfig is the single source of truth for what ``quantize_`` does: the method, default
weight/activation specs, which layers are in scope (regexes over module paths such as
``unet.down_blocks.0.resnets.0.conv1``), ordered per-layer rules (the last matching rule wins,
as in ai-edge-quantizer recipes) and the method's own parameters. It round-trips through JSON
and is versioned so old files keep loading or fail with a clear message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from toolchain.errors import ConfigError
from toolchain.quant.quantizer import QuantSpec
from toolchain.topology import DEFAULT_KIND, topology

CONFIG_VERSION = 1
# Default scope of the default model kind (toolchain.topology says why: UNet + VAE, time path excluded).
DEFAULT_INCLUDE = list(topology(DEFAULT_KIND).quant_include)
DEFAULT_EXCLUDE = list(topology(DEFAULT_KIND).quant_exclude)


def parse_bits(text: str) -> tuple[int, int]:
    """'w4a8' → (4, 8)."""
    m = re.fullmatch(r"\s*w(\d+)a(\d+)\s*", text.lower())
    if not m:
        raise ConfigError(f"bit setting '{text}' must look like w4a4, w8a8, w4a6")
    return int(m.group(1)), int(m.group(2))


@dataclass
class LayerRule:
    """Per-layer override: layers whose path matches ``pattern`` get these bits (None = keep)."""

    pattern: str
    w_bits: int | None = None
    a_bits: int | None = None
    skip: bool = False  # leave the layer in float entirely

    def __post_init__(self) -> None:
        try:
            self._regex = re.compile(self.pattern)
        except re.error as exc:
            raise ConfigError(f"invalid layer pattern '{self.pattern}': {exc}") from None
        for b in (self.w_bits, self.a_bits):
            if b is not None and not 2 <= b <= 16:
                raise ConfigError(f"rule '{self.pattern}': bits must be in 2..16, got {b}")

    def matches(self, name: str) -> bool:
        return self._regex.search(name) is not None

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "w_bits": self.w_bits, "a_bits": self.a_bits, "skip": self.skip}


@dataclass
class QuantConfig:
    method: str = "minmax"
    weight: QuantSpec = field(default_factory=lambda: QuantSpec(8, symmetric=True, per_channel=True))
    activation: QuantSpec = field(default_factory=lambda: QuantSpec(8, symmetric=False, per_channel=False))
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    rules: list[LayerRule] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    version: int = CONFIG_VERSION
    # where rules came from (pattern -> file), for messages only; not serialised
    rule_sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"quant config version {self.version} is not supported (this toolchain reads version {CONFIG_VERSION})")
        for pat in [*self.include, *self.exclude]:
            try:
                re.compile(pat)
            except re.error as exc:
                raise ConfigError(f"invalid layer pattern '{pat}': {exc}") from None

    @classmethod
    def for_bits(cls, method: str, bits: str, **kwargs: Any) -> "QuantConfig":
        w, a = parse_bits(bits)
        base = cls(method=method, **kwargs)
        base.weight = base.weight.with_bits(w)
        base.activation = base.activation.with_bits(a)
        return base

    @property
    def bits_label(self) -> str:
        return f"W{self.weight.bits}A{self.activation.bits}"

    def in_scope(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.include) and not any(re.search(p, name) for p in self.exclude)

    def layer_specs(self, name: str) -> tuple[QuantSpec, QuantSpec] | None:
        """The (weight, activation) specs for layer ``name``, or None if it stays float."""
        if not self.in_scope(name):
            return None
        w_bits, a_bits, skip = self.weight.bits, self.activation.bits, False
        for rule in self.rules:
            if rule.matches(name):
                skip = rule.skip
                w_bits = rule.w_bits if rule.w_bits is not None else w_bits
                a_bits = rule.a_bits if rule.a_bits is not None else a_bits
        if skip:
            return None
        return self.weight.with_bits(w_bits), self.activation.with_bits(a_bits)

    def check_matches(self, names: list[str], sources: dict[str, str] | None = None) -> None:
        """Refuse patterns that would silently do nothing on a model whose layer paths are ``names``.

        Every ``include`` pattern, every non-default ``exclude`` pattern and every rule must match at
        least one layer (rules: one in scope). ``sources`` maps a rule pattern to where it came from
        (e.g. an mp_table path) for the message. Raises ConfigError naming the first few misses."""
        sources = sources or {}
        misses: list[str] = []
        for pat in self.include:
            if not any(re.search(pat, n) for n in names):
                misses.append(f"--include '{pat}'")
        for pat in self.exclude:
            if pat not in DEFAULT_EXCLUDE and not any(re.search(pat, n) for n in names):
                misses.append(f"--exclude '{pat}'")
        in_scope = [n for n in names if self.in_scope(n)]
        table_misses: dict[str, int] = {}
        for rule in self.rules:
            if not any(rule.matches(n) for n in in_scope):
                src = sources.get(rule.pattern)
                if src is not None:
                    table_misses[src] = table_misses.get(src, 0) + 1
                else:
                    misses.append(f"rule '{rule.pattern}'")
        for src, count in table_misses.items():
            total = sum(1 for v in sources.values() if v == src)
            misses.insert(0, f"{src}: {count} of its {total} layers" + (" (none matches: written for another model?)" if count == total else ""))
        if misses:
            example = ", ".join(in_scope[:3]) or "none"
            verb = "matches" if len(misses) == 1 else "match"
            raise ConfigError(f"{'; '.join(misses[:4])}{' …' if len(misses) > 4 else ''} {verb} no quantizable layer in scope "
                              f"({len(in_scope)} in scope, e.g. {example}); nothing was written")

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "method": self.method,
            "weight": self.weight.to_dict(),
            "activation": self.activation.to_dict(),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "rules": [r.to_dict() for r in self.rules],
            "params": dict(self.params),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        known = {"version", "method", "weight", "activation", "include", "exclude", "rules", "params"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown quant config keys: {', '.join(sorted(unknown))}")
        try:
            return cls(
                method=d.get("method", "minmax"),
                weight=QuantSpec.from_dict(d["weight"]) if "weight" in d else QuantSpec(8, True, True),
                activation=QuantSpec.from_dict(d["activation"]) if "activation" in d else QuantSpec(8),
                include=list(d.get("include", DEFAULT_INCLUDE)),
                exclude=list(d.get("exclude", DEFAULT_EXCLUDE)),
                rules=[LayerRule(**r) for r in d.get("rules", [])],
                params=dict(d.get("params", {})),
                version=d.get("version", CONFIG_VERSION),
            )
        except TypeError as exc:
            raise ConfigError(f"invalid quant config: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> "QuantConfig":
        """Read a QuantConfig JSON file; raises ConfigError for unreadable JSON or anything but an object."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read quant config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"quant config {path} must be a JSON object with keys such as method, weight, activation, rules; "
                              f"it holds {type(data).__name__ if data is not None else 'null'}")
        try:
            return cls.from_dict(data)
        except (KeyError, ValueError, AttributeError) as exc:
            raise ConfigError(f"invalid quant config {path}: {exc}") from None


def quantizable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Conv2d/Linear modules (float or already quantized) with their paths, except those the model kind's
    topology marks as seeing only a constant prompt (OSEDiff's cross-attention k/v: their outputs are
    constants, folded by ``fold_constant_prompt`` at export)."""
    from toolchain.topology import topology_of

    topo = topology_of(model)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not topo.is_constant_prompt_module(name):
            yield name, module
