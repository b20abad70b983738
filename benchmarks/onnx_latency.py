"""ONNX Runtime CPU latency FP32 vs QDQ in one run, and on-disk sizes of the exports.

For each part the float model and a MinMax-calibrated quantized copy (random init is fine for
timing and size) are exported; sizes are summed over the parts; latency is measured for
--latency-parts with the same threads, warm-up and runs for both models.

    python benchmarks/onnx_latency.py --preset osdface --bits w4a4 --threads 16 --out benchmarks/results/onnx_osdface
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import toolchain  # noqa: E402,F401
from benchmarks.common import command_line, environment  # noqa: E402
from toolchain.calibration import BUNDLED_FACES  # noqa: E402
from toolchain.calibration.dataset import CalibrationSet, build_calibration_set  # noqa: E402
from toolchain.export.onnx_backend import export_onnx  # noqa: E402
from toolchain.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from toolchain.quant.registry import MethodContext  # noqa: E402
from toolchain.models import build_model, load_model, preset  # noqa: E402
from toolchain.profile.host import profile_onnx  # noqa: E402
from toolchain.quant.api import quantize_  # noqa: E402
from toolchain.quant.config import QuantConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--model", type=Path, default=None, help="trained weights instead of a random preset")
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--parts", default="unet,vae_encoder,vae_decoder,embedder")
    ap.add_argument("--latency-parts", default="full")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/onnx_latency"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    fp = load_model(args.model) if args.model else build_model(preset(args.preset), seed=0)
    cfg = fp.config
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q = load_model(args.model) if args.model else build_model(cfg, seed=0)
    calib = build_calibration_set([BUNDLED_FACES], args.work / "calib", n=args.images, size=cfg.image_size, seed=0, progress=False)
    t0 = time.perf_counter()
    quantize_(q.to(device), QuantConfig.for_bits(args.method, args.bits, params={"train_steps": 0} if args.method == "quantface" else {}),
              MethodContext(CalibrationSet.open(calib).batches(cfg.image_size, 1), device=device))
    q = q.cpu()
    results = {"command": command_line(), "environment": environment(), "preset": cfg.name, "model": str(args.model or "random init"),
               "method": args.method, "bits": args.bits, "image_size": cfg.image_size, "quantize_seconds": round(time.perf_counter() - t0, 1),
               "parts": {}, "latency": {}}
    parts = [p for p in args.parts.split(",") if p]
    lat = [p for p in args.latency_parts.split(",") if p]
    for part in dict.fromkeys(parts + lat):
        row = {}
        for label, model in (("fp32", fp), ("qdq", q)):
            path = args.work / f"{part}_{label}.onnx"
            t = time.perf_counter()
            rep = export_onnx(model, path, part=part)
            row[label] = {"bytes": rep["bytes"], "export_seconds": round(time.perf_counter() - t, 1), "int4_weight_layers": rep["int4_weight_layers"]}
            if part in lat:
                prof = profile_onnx(path, args.threads, args.runs, args.warmup, per_op=False)
                results["latency"].setdefault(part, {})[label] = prof["inference_ms"]
            atomic_write_json(args.out / "results.json", results | {"parts": {**results["parts"], part: row}})
            print(part, label, row[label], results["latency"].get(part, {}).get(label), flush=True)
        row["size_ratio"] = row["qdq"]["bytes"] / row["fp32"]["bytes"]
        results["parts"][part] = row
    size_parts = [p for p in parts if p in results["parts"]]
    if size_parts:
        total_fp = sum(results["parts"][p]["fp32"]["bytes"] for p in size_parts)
        total_q = sum(results["parts"][p]["qdq"]["bytes"] for p in size_parts)
        results["total"] = {"parts": size_parts, "fp32_bytes": total_fp, "qdq_bytes": total_q, "ratio": total_q / total_fp}
    atomic_write_json(args.out / "results.json", results)
    lines = [f"# ONNX export: size and ORT CPU latency, `{cfg.name}` ({args.method} {args.bits.upper()}, {cfg.image_size}px)\n",
             f"Command: `{results['command']}`  ",
             f"Device: {results['environment']['cpu']} ({args.threads} ORT threads), onnxruntime CPU EP; git {results['environment']['git']}\n",
             "| part | FP32 MB | QDQ MB | ratio |", "|---|---|---|---|"]
    for p, r in results["parts"].items():
        lines.append(f"| {p} | {r['fp32']['bytes'] / 1e6:.1f} | {r['qdq']['bytes'] / 1e6:.1f} | {r['size_ratio']:.3f} |")
    if "total" in results:
        t = results["total"]
        lines.append(f"| **total ({'+'.join(t['parts'])})** | {t['fp32_bytes'] / 1e6:.1f} | {t['qdq_bytes'] / 1e6:.1f} | **{t['ratio']:.3f}** |")
    lines += ["", "| part | FP32 median ms | QDQ median ms | QDQ / FP32 |", "|---|---|---|---|"]
    for p, r in results["latency"].items():
        lines.append(f"| {p} | {r['fp32']['median']:.1f} | {r['qdq']['median']:.1f} | {r['qdq']['median'] / r['fp32']['median']:.2f} |")
    atomic_write_text(args.out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
