"""What the default-session-safe QDQ format costs on ONNX Runtime's CPU EP, in one run.

The export format changed (issue: exported QDQ ONNX wrong in a default ORT session on AVX2 CPUs):
unsigned activation containers, uint8 weights with zero point 128, integer Clips between Q and DQ,
float biases as separate Adds. This times the bundled reference model's QDQ exports of both formats,
interleaved round by round on the same CPU: the previous format in the session it needed (five ORT
optimizers disabled, MatMulNBits accuracy level 0) and the new one in a default session.

    # 1. export with each revision (the previous one from a worktree of it)
    git worktree add /tmp/prev 8793fa3
    PYTHONPATH=/tmp/prev python benchmarks/onnx_qdq_format_cost.py export --out /tmp/qdq_prev
    python benchmarks/onnx_qdq_format_cost.py export --out /tmp/qdq_new
    # 2. time both in one run
    python benchmarks/onnx_qdq_format_cost.py time --prev /tmp/qdq_prev --new /tmp/qdq_new --out benchmarks/results/onnx_qdq_format_cost
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

PREV_DISABLED = ["WeightBiasQuantization", "ConvAddActivationFusion", "ConvActivationFusion", "QDQPropagationTransformer", "MatMulAddFusion"]


def export(out: Path, bits: list[str], images: int) -> None:
    import torch

    import toolchain  # noqa: F401
    from toolchain.calibration import BUNDLED_FACES
    from toolchain.calibration.dataset import CalibrationSet, build_calibration_set
    from toolchain.export.onnx_backend import export_onnx
    from toolchain.defaults import DEFAULT_MODEL
    from toolchain.quant.registry import MethodContext
    from toolchain.models import load_model
    from toolchain.quant.api import quantize_
    from toolchain.quant.config import QuantConfig

    out.mkdir(parents=True, exist_ok=True)
    fp = load_model(DEFAULT_MODEL)
    calib = build_calibration_set([BUNDLED_FACES], out / "calib", n=images, size=fp.config.image_size, seed=0, progress=False)
    for b in bits:
        q = load_model(DEFAULT_MODEL)
        quantize_(q, QuantConfig.for_bits("minmax", b), MethodContext(CalibrationSet.open(calib).batches(fp.config.image_size, 1)))
        export_onnx(q, out / f"{b}.onnx")
    export_onnx(fp, out / "fp32.onnx")
    x = torch.rand(1, 3, fp.config.image_size, fp.config.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    np.save(out / "input.npy", x.numpy())


def _session(path: Path, threads: int, prev: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if prev:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=PREV_DISABLED)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_both(prev: Path, new: Path, out: Path, threads: int, rounds: int, runs: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import onnxruntime as ort

    from benchmarks.common import command_line, environment
    from toolchain.io.atomic import atomic_write_json, atomic_write_text
    from toolchain.cpu import cpu_isa

    x = np.load(new / "input.npy")
    names = sorted(p.stem for p in new.glob("*.onnx"))
    sessions = {(n, "prev"): _session(prev / f"{n}.onnx", threads, True) for n in names if (prev / f"{n}.onnx").exists()}
    sessions |= {(n, "new"): _session(new / f"{n}.onnx", threads, False) for n in names}
    times: dict[tuple[str, str], list[float]] = {k: [] for k in sessions}
    for s in sessions.values():  # warm-up
        s.run(None, {s.get_inputs()[0].name: x})
    for _ in range(rounds):
        for k, s in sessions.items():
            feed = {s.get_inputs()[0].name: x}
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, feed)
                times[k].append((time.perf_counter() - t) * 1000)
    med = {f"{n}/{fmt}": float(np.median(v)) for (n, fmt), v in times.items()}
    rows = {n: {"prev_ms": med.get(f"{n}/prev"), "new_ms": med[f"{n}/new"],
                "new_over_prev": med[f"{n}/new"] / med[f"{n}/prev"] if f"{n}/prev" in med else None} for n in names}
    results = {"command": command_line(), "environment": environment(), "cpu_isa": cpu_isa(), "onnxruntime": ort.__version__,
               "threads": threads, "rounds": rounds, "runs_per_round": runs, "median_ms": rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    lines = ["# QDQ format cost on ONNX Runtime CPU (bundled reference model, 128 px, MinMax)\n", f"Command: `{results['command']}`  ",
             f"CPU: {results['environment']['cpu']}, ISA {', '.join(results['cpu_isa']['features'])}; {threads} ORT threads; "
             f"onnxruntime {ort.__version__}; {rounds} interleaved rounds × {runs} runs\n",
             "| model | previous format, its session (ms) | new format, default session (ms) | new / previous |", "|---|---|---|---|"]
    for n, r in rows.items():
        ratio = f"{r['new_over_prev']:.2f}" if r["new_over_prev"] else "-"
        lines.append(f"| {n} | {r['prev_ms']:.1f} | {r['new_ms']:.1f} | {ratio} |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--bits", default="w8a8,w4a8,w4a4")
    e.add_argument("--images", type=int, default=4)
    t = sub.add_parser("time")
    t.add_argument("--prev", type=Path, required=True)
    t.add_argument("--new", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--rounds", type=int, default=5)
    t.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    if a.cmd == "export":
        export(a.out, a.bits.split(","), a.images)
    else:
        time_both(a.prev, a.new, a.out, a.threads, a.rounds, a.runs)


if __name__ == "__main__":
    main()
