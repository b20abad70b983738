"""`toolchain compare`: methods × bit settings on a held-out set, in the paper's table format."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="run quantize → restore → eval for a list of methods and bit settings",
                       description="Reads a JSON spec (list of {label, method, params, bits, mp?, calib_batches?}), quantizes each entry (cached in "
                                   "--work, so reruns resume), evaluates on --eval against HQ and the float model, and writes "
                                   "<name>.md / <name>.json and per-bits image grids to --out.")
    p.add_argument("--spec", type=Path, required=True)
    p.add_argument("--model", type=Path, default=None, help="float model (default: bundled reference model)")
    p.add_argument("--calib", type=Path, required=True)
    p.add_argument("--eval", type=Path, required=True, help="held-out HQ/LQ set")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=None, help="checkpoint cache (default <out>/work)")
    p.add_argument("--name", default="compare")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from toolchain.commands.common import resolve_model_path
    from toolchain.compare import run_comparison, validate_spec
    from toolchain.defaults import device_from_arg
    from toolchain.errors import ConfigError

    try:
        spec = json.loads(args.spec.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read comparison spec {args.spec}: {exc}") from None
    validate_spec(spec, f"comparison spec {args.spec}")
    from toolchain.errors import OutputError
    from toolchain.io.outputs import check_not_input, output_lock

    if args.out.exists() and not args.out.is_dir():
        raise OutputError(f"--out {args.out} is an existing file; compare writes a folder (table, grids, cache)")
    check_not_input(args.out, [args.spec, args.model, args.calib, args.eval], replaced_whole=False)
    from toolchain.calibration.dataset import CalibrationSet
    from toolchain.models.storage import model_config

    upscale = int(getattr(model_config(resolve_model_path(args.model)), "upscale", 1) or 1)
    for folder in (args.calib, args.eval):  # both sets must match the model's task, before the lock or any file
        CalibrationSet.open(folder).check_for(upscale)
    device = device_from_arg(args.device)
    with output_lock(args.out):
        run_comparison(spec, resolve_model_path(args.model), args.calib, args.eval, args.out, args.work or args.out / "work",
                       device, name=args.name)
    print(f"table: {args.out / (args.name + '.md')}")
    return 0
