"""`toolchain allocate`: per-layer activation bit-widths by sensitivity + integer program."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from toolchain.commands.common import add_nproc_arg, finite_float, maybe_relaunch, positive_int


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="quantized checkpoint whose calibrated ranges are used")
    p.add_argument("--calib", type=Path, required=True, help="calibration set")
    p.add_argument("--out", type=Path, required=True, help="allocation folder (caches, mp_table.json, plots)")
    p.add_argument("--images", type=positive_int, default=8, help="calibration images used (default 8)")
    p.add_argument("--device", default="auto")


def _sens_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", default="auto", help="auto | fid | lpips | st_lpips | mse (auto: first with local weights; st_lpips always works)")
    p.add_argument("--epsilon", type=finite_float, default=0.02, help="tolerance vs full precision (default 0.02)")
    p.add_argument("--start-bits", type=int, default=2)
    p.add_argument("--max-bits", type=int, default=8)
    p.add_argument("--workers", type=positive_int, default=1, help="parallel processes (one GPU each when available)")
    p.add_argument("--weights-dir", type=Path, default=None, help="metric backbone weights (LPIPS AlexNet, Inception)")
    add_nproc_arg(p)


def _err_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", default="3,4,5,6", help="candidate activation bits (default 3,4,5,6)")


def _solve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cost", choices=["act_bits", "bops"], default="act_bits", help="cost M_{i,b}: bits × activation elements, or bit-operations")
    p.add_argument("--budget-bits", type=finite_float, default=4.0, help="budget = cost of every layer at this many bits (default 4: uniform A4)")
    p.add_argument("--budget", type=finite_float, default=None, help="absolute budget in cost units (overrides --budget-bits)")
    p.add_argument("--pin", action="append", default=[], metavar="REGEX=BITS", help="fix matching layers' activation bits, e.g. 'conv_in$=8'")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("allocate", help="adaptive activation bit-widths: sensitivity sweep, error table, integer program",
                       description="Choose per-layer activation bits under a total budget (QuantFace §3.3). Stages cache their "
                                   "results in --out and resume; `all` runs them in order. Apply the result with "
                                   "`toolchain quantize --mp-table OUT/mp_table.json`.")
    asub = p.add_subparsers(dest="stage", required=True)
    s = asub.add_parser("sensitivity", help="per-layer bits B_i needed to stay within ε of full precision")
    _common(s), _sens_args(s)
    e = asub.add_parser("errors", help="error table L_{i,b} and element/MAC counts")
    _common(e), _err_args(e)
    v = asub.add_parser("solve", help="solve the integer program from cached sensitivity and errors; writes mp_table.json and plots")
    v.add_argument("--out", type=Path, required=True, help="allocation folder holding sensitivity.json and errors.json")
    _solve_args(v)
    a = asub.add_parser("all", help="sensitivity + errors + solve")
    _common(a), _sens_args(a), _err_args(a), _solve_args(a)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from toolchain.errors import OutputError
    from toolchain.io.outputs import check_not_input, output_lock

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is an existing file; allocate writes a folder (caches, mp_table.json, plots)")
    check_not_input(out, [getattr(args, "checkpoint", None), getattr(args, "calib", None)], replaced_whole=False)
    check_inputs(args)  # every input the stages read, before the lock, the relaunch or any file in --out
    status = maybe_relaunch(args)
    if status is not None:
        return status
    import contextlib

    from toolchain import distributed as D
    from toolchain.defaults import device_from_arg

    if not D.launched():
        with output_lock(out):
            return _run_locked(args, out)
    # under torchrun: the sweep is sharded over the ranks; the error table and the solve run on rank 0
    with D.session(device_from_arg(getattr(args, "device", "auto"))) as device:
        args.device = str(device)
        with output_lock(out) if D.is_main() else contextlib.nullcontext():
            D.barrier()
            try:
                if args.stage in ("sensitivity", "all"):
                    _run_locked(args, out, stages=("sensitivity",), quiet=not D.is_main())
                if D.is_main():
                    _run_locked(args, out, stages=("errors", "solve"))
            finally:
                D.barrier()
    return 0


def parse_bits(text: str) -> list[int]:
    from toolchain.errors import UsageError

    try:
        bits = [int(b) for b in text.split(",")]
    except ValueError:
        raise UsageError(f"--bits {text}: expected comma-separated integers, e.g. 3,4,5,6") from None
    if not bits or any(not 1 <= b <= 16 for b in bits):
        raise UsageError(f"--bits {text}: every bit-width must be between 1 and 16")
    return bits


def check_inputs(args: argparse.Namespace) -> None:
    """Refuse bad inputs of the requested stage(s) with one line before anything is created: the checkpoint,
    a calibration set of the model's task (SR pairs for an SR model, same-size pairs otherwise), the sweep
    settings, --bits, --pin, and for `solve` alone the cached error table."""
    stage = args.stage
    if stage in ("sensitivity", "errors", "all"):
        from toolchain.calibration.dataset import CalibrationSet
        from toolchain.quant.checkpoint import read_checkpoint_meta

        meta = read_checkpoint_meta(args.checkpoint)
        CalibrationSet.open(args.calib).check_for(int((meta.get("model_config") or {}).get("upscale", 1) or 1))
    if stage in ("sensitivity", "all"):
        from toolchain.alloc.sensitivity import SweepSettings

        SweepSettings(metric=args.metric, epsilon=args.epsilon, start_bits=args.start_bits, max_bits=args.max_bits, images=args.images)
    if stage in ("errors", "all"):
        parse_bits(args.bits)
    if stage in ("solve", "all"):
        from toolchain.alloc.allocate import parse_pin

        for pin in args.pin:
            parse_pin(pin)
    if stage == "solve":
        from toolchain.errors import ConfigError

        if not (args.out / "errors.json").is_file():
            raise ConfigError(f"{args.out / 'errors.json'} is missing; run `toolchain allocate errors` first")


def _run_locked(args: argparse.Namespace, out: Path, stages: tuple[str, ...] = ("sensitivity", "errors", "solve"),
                quiet: bool = False) -> int:
    from toolchain.alloc.allocate import SolveSettings, build_table, parse_pin
    from toolchain.io.atomic import atomic_write_json

    if args.stage in ("sensitivity", "all") and "sensitivity" in stages:
        from toolchain.alloc.sensitivity import SweepSettings, run_sensitivity
        from toolchain.defaults import device_from_arg

        settings = SweepSettings(metric=args.metric, epsilon=args.epsilon, start_bits=args.start_bits, max_bits=args.max_bits,
                                 images=args.images, weights_dir=str(args.weights_dir) if args.weights_dir else None)
        res = run_sensitivity(args.checkpoint, args.calib, out, settings, args.workers, str(device_from_arg(args.device)))
        if not quiet:
            print(f"sensitivity: {len(res)} layers, metric {next(iter(res.values()))['metric'] if res else '-'} -> {out / 'sensitivity.json'}")
    if args.stage in ("errors", "all") and "errors" in stages:
        from toolchain.alloc.error_table import error_table
        from toolchain.defaults import device_from_arg

        bits = parse_bits(args.bits)
        table = error_table(args.checkpoint, args.calib, bits, images=args.images, device=str(device_from_arg(args.device)))
        table["checkpoint"] = str(args.checkpoint)
        atomic_write_json(out / "errors.json", table)
        print(f"error table: {len(table['layers'])} layers x bits {bits} -> {out / 'errors.json'}")
    if args.stage in ("solve", "all") and "solve" in stages:
        from toolchain.errors import ConfigError

        if not (out / "errors.json").is_file():
            raise ConfigError(f"{out / 'errors.json'} is missing; run `toolchain allocate errors` first")
        errors = json.loads((out / "errors.json").read_text())
        sens_doc = json.loads((out / "sensitivity.json").read_text()) if (out / "sensitivity.json").is_file() else {"layers": {}}
        settings = SolveSettings(cost_model=args.cost, budget_bits=args.budget_bits, budget=args.budget, pins=[parse_pin(p) for p in args.pin])
        meta = {"metric": sens_doc.get("metric"), **(sens_doc.get("settings") or {})}
        table = build_table(sens_doc["layers"], errors, settings, errors.get("checkpoint", ""), out, meta)
        print(f"allocation: average A{table['average_a_bits']:.2f} at cost {table['cost']:.4g} <= budget {table['budget']:.4g} "
              f"({table['solver']['status']}, {table['solver']['seconds']:.3f} s) -> {out / 'mp_table.json'}")
    return 0
