"""`toolchain profile`: latency of an exported model on the host or, over adb, on a phone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from toolchain.commands.common import positive_int

    p = sub.add_parser("profile", help="measure latency of a .tflite/.onnx model on the host or a phone (adb)",
                       description="Host: LiteRT interpreter (threads, XNNPACK on/off) or ONNX Runtime with per-layer times. "
                                   "--adb: push to a connected phone, run LiteRT's benchmark_model with op profiling and parse it. "
                                   "--logcat: parse the Android demo's timing lines. Writes profile.json and a per-layer chart.")
    p.add_argument("model", type=Path, nargs="?", help=".tflite or .onnx file")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: <model>.profile/)")
    p.add_argument("--threads", type=positive_int, default=4)
    p.add_argument("--runs", type=positive_int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-xnnpack", action="store_true", help="host TFLite: builtin kernels only")
    p.add_argument("--designed", type=Path, default=None, help="mp_table.json or <model>.precision.json to chart designed bits")
    p.add_argument("--adb", action="store_true", help="run on a connected Android device with benchmark_model")
    p.add_argument("--adb-path", default="adb")
    p.add_argument("--serial", default=None, help="adb device serial")
    p.add_argument("--device-dir", default="/data/local/tmp")
    p.add_argument("--benchmark-binary", default=None, help="benchmark_model path on the device (default <device-dir>/benchmark_model)")
    p.add_argument("--delegate", default="xnnpack", help="adb: cpu, xnnpack, gpu or nnapi")
    p.add_argument("--parse", type=Path, default=None, help="parse a saved benchmark_model output instead of running")
    p.add_argument("--logcat", type=Path, default=None, help="parse the Android demo's logcat timings")
    p.add_argument("--shape", action="append", default=[], metavar="[NAME=]NxCxHxW",
                   help="host: concrete shape for a dynamic input, e.g. lq_image=1x3x64x64 (height/width must be multiples of "
                        "the export's spatial multiple, recorded in its metadata and report); repeatable")
    p.set_defaults(func=run)


def _read_log(path: Path) -> str:
    from toolchain.errors import InputError

    if not path.is_file():
        raise InputError(f"log file not found: {path}")
    text = path.read_text(errors="replace")
    if not text.strip():
        raise InputError(f"{path} is empty; save the tool's output (or `adb logcat -d`) into it first")
    return text


def check_benchmark(report: dict, source: str) -> None:
    """Refuse a benchmark_model report that failed or holds no timings (exit non-zero with the tool's last error line)."""
    from toolchain.errors import ToolchainError

    errors = report.get("errors") or []
    if report.get("failed"):
        raise ToolchainError(f"benchmark_model failed ({source}): {errors[-1] if errors else 'no error line printed'}")
    if not report.get("inference_ms"):
        last = f"; its last error line: {errors[-1]}" if errors else ""
        raise ToolchainError(f"no inference timings in {source} (is it benchmark_model output?){last}")


def run(args: argparse.Namespace) -> int:
    import sys

    from toolchain.errors import OutputError

    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise OutputError(f"--out {args.out} is an existing file; profile writes a folder (profile.json, chart)")

    from toolchain.errors import ConfigError, InputError
    from toolchain.profile.report import designed_bits, write_report

    if args.logcat:
        from toolchain.profile.adb import parse_demo_logcat

        report = parse_demo_logcat(_read_log(args.logcat))
        if not report.get("stages_ms"):
            raise InputError(f"{args.logcat} holds no 'QuantFaceDemo: timing' lines from the Android demo")
        inference = report["stages_ms"].get("inference")
        if inference:
            report["inference_ms"] = dict(inference)
    elif args.parse:
        from toolchain.profile.benchmark_parser import parse_benchmark_output

        report = parse_benchmark_output(_read_log(args.parse))
        report["runtime"] = "benchmark_model (parsed)"
        check_benchmark(report, str(args.parse))
    elif args.model is None or not args.model.is_file():
        raise ConfigError(f"model file not found: {args.model}")
    elif args.adb:
        from toolchain.profile.adb import profile_over_adb

        report = profile_over_adb(args.model, args.adb_path, args.device_dir, args.benchmark_binary, args.threads, args.runs, args.warmup,
                                  args.delegate, args.serial)
        check_benchmark(report, "adb run")
    else:
        from toolchain.profile.host import host_info, parse_shapes, profile_onnx, profile_tflite

        shapes = parse_shapes(args.shape)
        if args.model.suffix == ".tflite":
            report = profile_tflite(args.model, args.threads, args.runs, args.warmup, not args.no_xnnpack, shapes=shapes)
        elif args.model.suffix == ".onnx":
            report = profile_onnx(args.model, args.threads, args.runs, args.warmup, shapes=shapes)
        else:
            raise ConfigError(f"{args.model}: profile .tflite or .onnx files")
        report["host"] = host_info()
    report["model"] = str(args.model) if args.model else None
    designed = args.designed
    if designed is None and args.model is not None:  # the export's own sidecar, if it is beside the model
        for side in (args.model.with_suffix(".precision.json"), Path(str(args.model) + ".json")):
            if side.is_file():
                designed = side
                break
    out = args.out or Path(str(args.model or args.logcat or args.parse) + ".profile")
    path = write_report(report, out, designed_bits(designed))
    inf = report.get("inference_ms") or {}
    summary = {"runtime": report.get("runtime"), "median_ms": inf.get("median", inf.get("avg")), "report": str(path)}
    if report.get("signatures"):  # a one-file pipeline: the median of every signature (TFLite) / stage (ONNX)
        summary["signatures_median_ms"] = {k: v["inference_ms"]["median"] for k, v in report["signatures"].items()}
    if report.get("fallback"):
        summary["partial_delegation"] = True
        print("warning: only part of the graph ran on the delegate; the rest fell back to the CPU "
              f"({'; '.join((report.get('delegate_messages') or ['see delegation in the report'])[:2])})", file=sys.stderr)
    print(json.dumps(summary))
    return 0
