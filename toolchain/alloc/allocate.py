"""From sensitivity + error table to a validated mixed-precision table (and its plots)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolchain.alloc.error_table import cost
from toolchain.alloc.plots import plot_bits, plot_sensitivity
from toolchain.alloc.solver import solve
from toolchain.alloc.table import average_bits, recipe_rules, save_table
from toolchain.errors import ConfigError
from toolchain.io.atomic import atomic_write_json


@dataclass
class SolveSettings:
    cost_model: str = "act_bits"
    budget_bits: float | None = 4.0  # budget = cost of every layer at this many activation bits
    budget: float | None = None  # or an absolute cost
    pins: list[tuple[str, int]] = field(default_factory=list)  # (regex, bits)
    time_limit: float = 60.0


def parse_pin(text: str) -> tuple[str, int]:
    pattern, sep, bits = text.rpartition("=")
    if not sep or not bits.isdigit():
        raise ConfigError(f"--pin expects REGEX=BITS, got '{text}'")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--pin pattern '{pattern}': {exc}") from None
    return pattern, int(bits)


def build_table(sensitivity: dict[str, Any], errors: dict[str, Any], settings: SolveSettings, source: str,
                out: Path, sens_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    bits = [int(b) for b in errors["bits"]]
    layers = errors["layers"]
    names = sorted(layers, key=lambda n: layers[n].get("order", 0))
    err: dict[str, dict[int, float]] = {}
    cst: dict[str, dict[int, float]] = {}
    pinned: dict[str, int] = {}
    for name in names:
        w = float(sensitivity[name]["w"]) if name in sensitivity else 1.0
        for pattern, b in settings.pins:
            if re.search(pattern, name):
                pinned[name] = b
        allowed = [pinned[name]] if name in pinned else bits
        err[name] = {b: (w**2) * layers[name]["errors"].get(str(b), 0.0) for b in allowed}
        cst[name] = {b: cost(layers[name], b, settings.cost_model) for b in allowed}
    unused = [pattern for pattern, _ in settings.pins if not any(re.search(pattern, n) for n in names)]
    if unused:
        raise ConfigError(f"--pin '{unused[0]}' matches no layer of the error table ({len(names)} layers, e.g. "
                          f"{', '.join(names[:2])}); nothing was written")
    if settings.budget is not None:
        budget = settings.budget
    elif settings.budget_bits is not None:
        budget = sum(settings.budget_bits / 1.0 * cost(layers[n], 1, settings.cost_model) for n in names)
    else:
        raise ConfigError("give a budget: --budget-bits B or --budget COST")
    alloc = solve(err, cst, budget, settings.time_limit)
    w_bits = {layers[n]["w_bits"] for n in names}
    rows = []
    for name in names:
        b = alloc.bits[name]
        row = {"name": name, "a_bits": b, "w_bits": layers[name]["w_bits"], "cost": cst[name][b], "elements": int(layers[name]["elements"]),
               "macs": int(layers[name]["macs"]), "pinned": name in pinned,
               "candidates": {str(k): {"error": err[name][k], "cost": cst[name][k]} for k in err[name]}}
        if name in sensitivity:
            row["sensitivity_bits"] = int(sensitivity[name]["B"])
            row["weight"] = float(sensitivity[name]["w"])
        rows.append(row)
    table = {
        "kind": "quantface-mp-table", "version": 1, "source_checkpoint": source,
        "w_bits": w_bits.pop() if len(w_bits) == 1 else None, "cost_model": settings.cost_model,
        "budget": budget, "cost": sum(r["cost"] for r in rows), "average_a_bits": average_bits(rows), "candidate_bits": bits,
        "sensitivity": sens_meta or {},
        "solver": {"name": {"cbc": "python-mip CBC", "highs": "HiGHS (scipy.optimize.milp)"}[alloc.solver], "status": alloc.status, "seconds": round(alloc.seconds, 4), "objective": alloc.objective},
        "layers": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_table(table, out / "mp_table.json")
    atomic_write_json(out / "recipe_rules.json", recipe_rules(table))  # the same result as recipe rules
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # a bare host (the GPU machines of benchmarks/device): the table is the result, the plots a view of it
        print(f"note: matplotlib is not installed; {out / 'sensitivity.png'} and {out / 'bits.png'} not drawn", flush=True)
        return table
    if all("sensitivity_bits" in r for r in rows):
        plot_sensitivity(rows, out / "sensitivity.png", (sens_meta or {}).get("epsilon", 0.0), (sens_meta or {}).get("metric", "?"))
    plot_bits(rows, out / "bits.png", f"chosen activation bits (average A{table['average_a_bits']:.2f}, budget {settings.budget_bits or budget})")
    return table
