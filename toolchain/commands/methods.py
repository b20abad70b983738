"""`toolchain methods`: list the registered quantization methods and their parameters."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list quantization methods and their parameters",
                       description="List every registered quantization method with its parameters and defaults "
                                   "(set them with `toolchain quantize --param KEY=VALUE`).")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from toolchain.quant.registry import param_defaults, registered_methods

    table = {name: {"about": cls.summary_doc, "params": param_defaults(name)} for name, cls in registered_methods().items()}
    if args.json:
        print(json.dumps(table, indent=2, default=str))
    else:
        for name, info in table.items():
            print(f"{name:<12} {info['about']}")
            for k, v in info["params"].items():
                print(f"{'':<14}{k} = {v!r}")
    return 0
