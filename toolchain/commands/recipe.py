"""`toolchain recipe validate FILE`: check a recipe without running anything."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipe", help="check recipe files (the JSON that `toolchain run` executes)",
                       description="Recipes fix a whole run: model, calibration, quantize runs (method, params, bits, "
                                   "per-layer rules, allocation), exports and profiles. See README 'Recipes'.")
    rsub = p.add_subparsers(dest="recipe_cmd", required=True)
    v = rsub.add_parser("validate", help="check a recipe against the schema, the registered methods and their parameters",
                        description="Check a recipe file against toolchain/schemas/recipe.schema.json, the registered methods "
                                    "and each method's typed parameters, the bits, regexes and the references between sections; then against "
                                    "this machine: the model and image folders exist, the device is here, the metrics are known, "
                                    "every rule matches a layer of the model. Prints the stages `toolchain run` would execute (JSON).")
    v.add_argument("recipe", type=Path)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from toolchain.recipe import load_recipe
    from toolchain.recipe.model import check_against_machine

    from toolchain.commands.run import plan

    r = load_recipe(args.recipe)
    checked = check_against_machine(r)  # files, device, metrics, rules vs the model's layers
    stages = [s.name for s in plan(r, Path("OUT"))]  # (planning writes nothing)
    print(json.dumps({"recipe": str(args.recipe), "valid": True, "name": r.name, "model": checked,
                      "quantize": {q.name: {"method": q.method, "bits": q.bits, "params": q.params, "rules": len(q.rules),
                                            "allocate": q.allocate is not None} for q in r.quantize},
                      "stages": stages}, indent=2, default=str))
    return 0
