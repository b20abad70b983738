"""ONNX Runtime CPU latency and parity of the two QDQ formats (`--qdq-format exact` / `ort`), in one run.

Bundled reference model at 128 px, MinMax W8A8 and W4A8 calibrated on the bundled faces (the ort
format's output grids on the same faces). For each export: the fused integer nodes in ORT's optimised
graph vs the quantized layer count, PSNR vs the PyTorch fake-quant model on held-out faces (UTKFace
held-out split when ../shared is present, else the bundled faces with another degradation seed), and
latency at ``--threads`` ORT threads, all sessions interleaved round by round on the same CPU.

    python benchmarks/onnx_qdq_ort_speed.py --out benchmarks/results/onnx_qdq_ort_speed
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bits", default="w8a8,w4a8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--eval-images", type=int, default=4)
    a = ap.parse_args()

    import onnxruntime as ort
    import torch

    import toolchain  # noqa: F401
    from benchmarks.common import command_line, environment
    from toolchain.calibration import BUNDLED_FACES
    from toolchain.calibration.dataset import CalibrationSet, build_calibration_set
    from toolchain.export.onnx_backend import export_onnx
    from toolchain.export.qdq.output_grids import default_calib_inputs
    from toolchain.export.qdq.runtime import ort_session
    from toolchain.export.validate import compare
    from toolchain.defaults import DEFAULT_MODEL
    from toolchain.io.atomic import atomic_write_json, atomic_write_text
    from toolchain.quant.registry import MethodContext
    from toolchain.models import load_model
    from toolchain.cpu import cpu_isa
    from toolchain.quant.api import quantize_
    from toolchain.quant.calibrate import quant_layers
    from toolchain.quant.config import QuantConfig

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="qdq_ort_"))
    fp = load_model(DEFAULT_MODEL)
    calib = default_calib_inputs(fp, "full", 3)
    utk = Path(__file__).resolve().parents[2] / "shared" / "assets" / "faces" / "utkface"
    if utk.is_dir():
        import json

        names = json.loads((Path(__file__).parent / "results" / "reference_model" / "split.json").read_text())["heldout"][: a.eval_images]
        src = tmp / "heldout_src"
        src.mkdir()
        for n in names:
            (src / n).symlink_to(utk / n)
        eval_set, eval_src = src, "UTKFace held-out split"
    else:
        eval_set, eval_src = BUNDLED_FACES, "bundled faces (degradation seed 7)"
    eval_root = build_calibration_set([eval_set], tmp / "eval", n=a.eval_images, size=fp.image_size, seed=7, progress=False)
    xs = CalibrationSet.open(eval_root).batches(fp.image_size, 1)
    export_onnx(fp, tmp / "fp32.onnx")
    models, rows = {"fp32": tmp / "fp32.onnx"}, {}
    for b in a.bits.split(","):
        q = load_model(DEFAULT_MODEL)
        quantize_(q, QuantConfig.for_bits("minmax", b), MethodContext([c[0] for c in calib]))
        with torch.no_grad():
            ref = np.concatenate([q(x).numpy() for x in xs])
        # ort-s8 differs from ort only for 8-bit weights (int8 instead of uint8 + 128)
        for fmt in ("exact", "ort") + (("ort-s8",) if b.startswith("w8") else ()):
            t0 = time.perf_counter()
            rep = export_onnx(q, tmp / f"{b}_{fmt}.onnx", qdq_format=fmt, calib_inputs=calib if fmt.startswith("ort") else None)
            name = f"{b}_{fmt}"
            models[name] = Path(rep["path"])
            sess = ort_session(rep["path"], threads=a.threads)
            out = np.concatenate([sess.run(None, {"lq_image": x.numpy()})[0] for x in xs])
            rows[name] = {"export_s": round(time.perf_counter() - t0, 1), "quantized_layers": len(list(quant_layers(q))),
                          "psnr_vs_fake_quant_db": round(compare(out, ref, True)["psnr_db"], 2)}
            if fmt.startswith("ort"):
                rows[name] |= {"ort_layers": rep["ort_layers"], "fused_nodes": rep["ort_fused_nodes"],
                               "output_grid_sqnr_db_worst": rep["output_grid_sqnr_db_worst"]}
    x = np.random.RandomState(0).uniform(-1, 1, (1, 3, fp.image_size, fp.image_size)).astype(np.float32)
    sessions = {n: ort_session(p, threads=a.threads) for n, p in models.items()}
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for s in sessions.values():
        s.run(None, {"lq_image": x})
    for _ in range(a.rounds):
        for n, s in sessions.items():
            for _ in range(a.runs):
                t = time.perf_counter()
                s.run(None, {"lq_image": x})
                times[n].append((time.perf_counter() - t) * 1000)
    fp_med = float(np.median(times["fp32"]))
    for n, v in times.items():
        rows.setdefault(n, {})
        rows[n] |= {"median_ms": round(float(np.median(v)), 1), "min_ms": round(float(np.min(v)), 1),
                    "over_fp32": round(float(np.median(v)) / fp_med, 3)}
    results = {"command": command_line(), "environment": environment(), "cpu_isa": cpu_isa(), "onnxruntime": ort.__version__,
               "threads": a.threads, "rounds": a.rounds, "runs_per_round": a.runs, "image_size": fp.image_size,
               "eval_images": f"{len(xs)} x {eval_src}", "calibration": "3 bundled faces (quantize and ort output grids)", "models": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out / "results.json", results)
    lines = ["# ORT CPU: exact vs ort QDQ format (bundled reference model, 128 px, MinMax)\n", f"Command: `{results['command']}`  ",
             f"CPU: {results['environment'].get('cpu')}, ISA {', '.join(results['cpu_isa']['features'])}; {a.threads} ORT threads; "
             f"onnxruntime {ort.__version__}; {a.rounds} interleaved rounds x {a.runs} runs; PSNR on {results['eval_images']}\n",
             "| model | median ms | min ms | / FP32 | fused nodes / quantized layers | PSNR vs fake quant (dB) |", "|---|---|---|---|---|---|"]
    for n, r in rows.items():
        fused = f"{r['fused_nodes']['fused_total']} / {r['quantized_layers']}" if "fused_nodes" in r else "-"
        psnr = r.get("psnr_vs_fake_quant_db", "-")
        lines.append(f"| {n} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['over_fp32']:.2f} | {fused} | {psnr} |")
    atomic_write_text(a.out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
