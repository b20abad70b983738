"""LiteRT host latency: float TFLite vs integer TFLite (W8A8, W4A4) in one run, plus file sizes.

The float model and MinMax-calibrated copies are exported with ``export_tflite`` (integer recipe
with the checkpoint's own ranges) and timed with the LiteRT Python interpreter (XNNPACK on, same
threads/warm-up/runs for all). Runs on CPU; the numbers describe this host, not a phone — for a
phone use ``toolchain profile MODEL --adb``.

    python benchmarks/tflite_latency.py --preset tiny --bits w8a8,w4a8,w4a4 --out benchmarks/results/tflite_tiny
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import toolchain  # noqa: E402,F401
from benchmarks.common import command_line, environment  # noqa: E402
from calibration import BUNDLED_FACES  # noqa: E402
from calibration.dataset import CalibrationSet, build_calibration_set  # noqa: E402
from export.tflite_backend import export_tflite  # noqa: E402
from toolchain.defaults import DEFAULT_MODEL  # noqa: E402
from toolchain.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from toolchain.methods.registry import MethodContext  # noqa: E402
from toolchain.models import build_model, load_model, preset  # noqa: E402
from toolchain.profile.host import profile_tflite  # noqa: E402
from toolchain.quant.api import quantize_  # noqa: E402
from toolchain.quant.config import QuantConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="float model (default: bundled reference model)")
    ap.add_argument("--preset", default=None, help="use a random-init preset instead of --model")
    ap.add_argument("--bits", default="w8a8,w4a4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tflite_latency"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    fp = build_model(preset(args.preset), seed=0) if args.preset else load_model(args.model)
    size = fp.config.image_size
    calib = build_calibration_set([BUNDLED_FACES], args.work / "calib", n=args.images, size=size, seed=0, progress=False)
    batches = CalibrationSet.open(calib).batches(size, 1)
    inputs = [(b,) for b in batches]
    rows = []
    variants = [("float", None)] + [(b, b) for b in args.bits.split(",")]
    for label, bits in variants:
        model = build_model(preset(args.preset), seed=0) if args.preset else load_model(args.model)
        if bits:
            quantize_(model, QuantConfig.for_bits("minmax", bits), MethodContext(batches))
        path = args.work / f"{label}.tflite"
        rep = export_tflite(model, path, calib_inputs=inputs if bits else None, validate_inputs=inputs[:2])
        prof = profile_tflite(path, threads=args.threads, runs=args.runs, warmup=args.warmup)
        rows.append({"variant": label, "bytes": path.stat().st_size, "latency_ms": prof["inference_ms"],
                     "validation": rep.get("validation"),
                     "integer_layers": rep.get("layers_quantized"), "float_fallback_layers": rep.get("float_fallback_layers")})
        print(label, rows[-1]["bytes"], rows[-1]["latency_ms"], flush=True)
    result = {"command": command_line(), "environment": environment(), "model": str(args.preset or args.model), "image_size": size,
              "threads": args.threads, "runs": args.runs, "warmup": args.warmup, "rows": rows}
    atomic_write_json(args.out / "results.json", result)
    fl = rows[0]
    lines = [f"# LiteRT host latency: float vs integer TFLite ({result['model']}, {size}px)", "",
             f"Command: `{result['command']}`  ", f"Host: {result['environment'].get('cpu', '?')}, {args.threads} threads, XNNPACK on, "
             f"{args.warmup} warm-up + {args.runs} runs", "",
             "| variant | file MB | vs float size | median ms | min ms | vs float latency |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['bytes'] / 1e6:.2f} | {r['bytes'] / fl['bytes']:.3f} | {r['latency_ms']['median']:.1f} | "
                     f"{r['latency_ms']['min']:.1f} | {r['latency_ms']['median'] / fl['latency_ms']['median']:.2f} |")
    atomic_write_text(args.out / "results.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
