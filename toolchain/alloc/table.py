"""The mixed-precision table artifact: build, validate (JSON Schema + consistency), load, apply."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from toolchain.errors import ConfigError
from toolchain.io.atomic import atomic_write_json

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "mp_table.schema.json"


def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate_table(table: dict[str, Any], where: str = "mp table") -> dict[str, Any]:
    import jsonschema

    try:
        jsonschema.validate(table, schema())
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ConfigError(f"{where} is invalid at {path}: {exc.message}") from None
    names = [l["name"] for l in table["layers"]]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"{where} lists layer '{dup}' twice")
    total = sum(l["cost"] for l in table["layers"])
    if abs(total - table["cost"]) > 1e-6 * max(1.0, total):
        raise ConfigError(f"{where}: recorded cost {table['cost']} differs from the sum of layer costs {total}")
    return table


def save_table(table: dict[str, Any], path: str | Path) -> Path:
    validate_table(table)
    return atomic_write_json(path, table)


def load_table(path: str | Path) -> dict[str, Any]:
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read mixed-precision table {path}: {exc}") from None
    return validate_table(table, str(path))


def table_rules(table: dict[str, Any]):
    """Per-layer QuantConfig rules (exact-name regexes) that apply the table's bits."""
    from toolchain.quant.config import LayerRule

    return [LayerRule(f"^{re.escape(l['name'])}$", l.get("w_bits"), l["a_bits"]) for l in table["layers"]]


def recipe_rules(table: dict[str, Any]) -> list[dict[str, Any]]:
    """The table's per-layer bits as recipe rules (``{"match": "^name$", "w_bits", "a_bits"}``, the format of a
    recipe's ``quantize[].rules``): what ``toolchain run`` adds to the run's rules, and what a user can paste."""
    return [{"match": f"^{re.escape(l['name'])}$", **({"w_bits": l["w_bits"]} if l.get("w_bits") else {}), "a_bits": l["a_bits"]}
            for l in table["layers"]]


def average_bits(layers: list[dict[str, Any]]) -> float:
    """Activation bits averaged over activation elements (the paper's "A3.98")."""
    total = sum(l.get("elements", 1) for l in layers)
    return sum(l["a_bits"] * l.get("elements", 1) for l in layers) / max(1, total)
