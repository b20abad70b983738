"""`toolchain eval`: score the float model and quantized checkpoints on an HQ/LQ set."""

from __future__ import annotations

import argparse
from pathlib import Path

from toolchain.commands.common import positive_int
from toolchain.commands.common import add_runtime_args, resolve_model_path


# The names toolchain.eval.metrics knows (PAIRED_METRICS + SET_METRICS), kept here so --help needs no torch; a test checks they agree.
METRIC_NAMES = ("psnr", "ssim", "st_lpips", "lpips", "identity_deg", "lmd", "niqe", "fid", "fd_stlpips")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate float and quantized models: metrics, accounting, image grid",
                       description="Restore the LQ images of a calibration/eval set with the float model and each checkpoint, "
                                   "score them against HQ and against the float output, count params/ops per layer, and write "
                                   "report.json plus a grid PNG (LQ | FP | checkpoints | HQ).")
    p.add_argument("--data", type=Path, required=True, help="HQ/LQ set folder (from `toolchain calibrate`)")
    p.add_argument("--model", type=Path, default=None, help="float reference model (default: the checkpoint's source model, else bundled)")
    p.add_argument("--preset", default=None, help="architecture preset for model files without config")
    p.add_argument("--checkpoint", type=Path, action="append", default=[], help="quantized checkpoint dir; repeatable")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images")
    p.add_argument("--metrics", default="psnr,ssim,st_lpips,identity_deg,lmd,niqe,fd_stlpips,lpips,fid",
                   help=f"comma list of {', '.join(METRIC_NAMES)} (lpips and fid need weights in --weights-dir; identity_deg and "
                        "lmd need the packages dlib-bin and face-recognition-models; niqe needs images of at least 96 px; "
                        "a metric that cannot run is skipped with the reason; an unknown name is an error)")
    p.add_argument("--weights-dir", type=Path, default=None, help="folder with metric backbone weights (LPIPS AlexNet, Inception)")
    p.add_argument("--accounting-size", type=int, default=None, help="input size for params/ops accounting (default: model size)")
    p.add_argument("--out", type=Path, required=True, help="output folder for report.json and grid.png (other files in it are left alone)")
    p.add_argument("--grid-rows", type=positive_int, default=4)
    add_runtime_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from toolchain.errors import OutputError
    from toolchain.eval.report import evaluate_to_folder
    from toolchain.io.outputs import check_not_input, output_lock

    check_not_input(args.out, [args.data, *args.checkpoint], replaced_whole=False)
    if args.out.exists() and not args.out.is_dir():
        raise OutputError(f"--out {args.out} is an existing file; eval writes a folder (report.json, grid.png)")
    with output_lock(args.out):
        report = evaluate_to_folder(args.data, args.checkpoint, args.out, model=args.model, preset=args.preset, metrics=args.metrics,
                                    weights_dir=args.weights_dir, device=args.device, limit=args.limit, batch_size=args.batch_size,
                                    accounting_size=args.accounting_size, grid_rows=args.grid_rows)
    import sys

    for name, why in report.get("skipped_metrics", {}).items():  # not only inside report.json
        print(f"warning: metric {name} skipped: {why}", file=sys.stderr)
    for label, res in report["results"].items():
        hq = res.get("vs_hq", {})
        fp = res.get("vs_fp", {})
        line = f"{label:>22}: vs HQ PSNR {hq.get('psnr', float('nan')):.2f} dB"
        if "st_lpips" in hq:
            line += f", ST-LPIPS {hq['st_lpips']:.4f}"
        if "identity_deg" in hq:
            line += f", ID {hq['identity_deg']:.1f}°"
        if "lmd" in hq:
            line += f", LMD {hq['lmd']:.2f} px"
        if "niqe" in hq:
            line += f", NIQE {hq['niqe']:.2f}"
        if fp:
            line += f" | vs FP PSNR {fp.get('psnr', float('nan')):.2f} dB"
        print(line)
    print(f"report: {args.out / 'report.json'}  grid: {args.out / 'grid.png'}")
    return 0


__all__ = ["register", "run", "resolve_model_path"]
