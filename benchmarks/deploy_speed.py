"""Issue 18's deployment figures in one run on one CPU: ORT QDQ (``--qdq-format ort``) vs FP32 for the UNet and
the VAE decoder, W8A8 end-to-end parity of the ORT pipeline, and the summary ``results.json`` that also takes the
one-file TFLite pipeline rows measured by ``benchmarks/tflite_latency.py --parts full`` on the same machine.

The model is a random-init preset (``osdface``: SD-2.1 sizes, 512 px); latency does not depend on the weight
values, and parity is a numerical check of the exporter (PyTorch fake quant vs the runtime on the same
weights), not a quality figure. Quantization: MinMax at each ``--bits`` calibrated on ``--calib-images``
bundled faces; ORT's op-output grids are fitted on the same images; parity is measured on other bundled
faces (``--val-images``). Every ONNX file is timed in a fresh process (default ORT session, ``--threads``
intra-op threads), all files interleaved round by round (``--rounds``), so host drift hits each alike.
Finished steps are kept in ``--work`` and skipped when the script is run again.

    python benchmarks/tflite_latency.py --preset osdface --parts full --variants float,w4a4:int8,w8a8 --threads 2 \\
        --runs 3 --warmup 1 --images 1 --validate-images 1 --lean --work /tmp/dsp/tfl --out benchmarks/results/deploy_speed/tflite_pipeline
    python benchmarks/deploy_speed.py --preset osdface --work /tmp/dsp/ort --out benchmarks/results/deploy_speed
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import toolchain  # noqa: E402,F401
from benchmarks.common import command_line, environment  # noqa: E402
from toolchain.calibration import BUNDLED_FACES  # noqa: E402
from toolchain.calibration.dataset import CalibrationSet, build_calibration_set  # noqa: E402
from toolchain.export.onnx_backend import export_onnx, validate_onnx  # noqa: E402
from toolchain.export.parts import part_inputs  # noqa: E402
from toolchain.export.qdq.runtime import FUSED_OPS  # noqa: E402
from toolchain.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from toolchain.models import build_model, preset  # noqa: E402
from toolchain.quant.api import quantize_  # noqa: E402
from toolchain.quant.config import QuantConfig  # noqa: E402
from toolchain.quant.registry import MethodContext  # noqa: E402

PARTS = ("unet", "vae_decoder")


def time_in_fresh_process(path: Path, threads: int, runs: int, warmup: int) -> dict:
    """Median/min/max ms of a default ORT session on ``path`` in a new interpreter (no torch heap or thread pools)."""
    code = ("import json, sys; from toolchain.profile.host import profile_onnx; "
            "print(json.dumps(profile_onnx(sys.argv[1], threads=int(sys.argv[2]), runs=int(sys.argv[3]), warmup=int(sys.argv[4]), per_op=False)))")
    done = subprocess.run([sys.executable, "-c", code, str(path), str(threads), str(runs), str(warmup)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def kept(path: Path, make) -> dict:
    """``make()``'s JSON result, cached in ``path`` (an interrupted run resumes after its last finished step)."""
    if path.is_file():
        return json.loads(path.read_text())
    res = make()
    atomic_write_json(path, res)
    return res


def onnx_bytes(path: Path) -> int:
    """Size of an ONNX file with its external data (``model.onnx.data``) if any."""
    data = Path(f"{path}.data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def psnr_summary(val: dict) -> dict:
    return {k: val.get(k) for k in ("metric", "median_vs_fake_quant", "median_vs_fp", "median_fake_quant_vs_fp", "max_abs_error", "cpu")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="osdface")
    ap.add_argument("--bits", default="w8a8,w4a8", help="MinMax bit settings exported with --qdq-format ort (8-bit activations: "
                    "the QLinear node units take 8-bit grids; narrower ones stay in the exact form)")
    ap.add_argument("--formats", default="ort", help="comma-separated --qdq-format values (ort, ort-s8, exact)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calib-images", type=int, default=1)
    ap.add_argument("--val-images", type=int, default=1)
    ap.add_argument("--pipeline-parity", default="w8a8", help="bit setting whose whole-pipeline ONNX (--part full, first format) is "
                    "validated end to end ('' to skip)")
    ap.add_argument("--tflite-results", type=Path, default=None, help="results.json of tflite_latency.py --parts full (default: "
                    "OUT/tflite_pipeline/results.json when present)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/deploy_speed"))
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)

    fp = build_model(preset(a.preset), seed=0).eval()
    size = fp.config.image_size
    n = a.calib_images + a.val_images
    root = build_calibration_set([BUNDLED_FACES], a.work / "images", n=n, size=size, seed=0, progress=False)
    images = CalibrationSet.open(root).batches(size, 1)
    calib, val = images[: a.calib_images], images[a.calib_images:]
    files: dict[str, Path] = {}
    rows: dict[str, dict] = {}

    for part in PARTS:
        path = a.work / f"{part}__fp32.onnx"

        def export_fp32(part=part, path=path, model=fp) -> dict:
            export_onnx(model, path, part=part)
            return {"part": part, "variant": "fp32", "bytes": onnx_bytes(path)}

        rows[f"{part}__fp32"] = kept(a.work / f"{part}__fp32.json", export_fp32)
        files[f"{part}__fp32"] = path
    bits_list = [b for b in a.bits.split(",") if b]
    formats = [f for f in a.formats.split(",") if f]
    for bits in bits_list:
        q = None
        for fmt in formats:
            for part in PARTS + (("full",) if bits == a.pipeline_parity and fmt == formats[0] else ()):
                key = f"{part}__{bits}_{fmt}"
                if part != "full":
                    files[key] = a.work / f"{key}.onnx"
                if (a.work / f"{key}.json").is_file():
                    rows[key] = json.loads((a.work / f"{key}.json").read_text())
                    print(f"{key}: kept from an earlier run", flush=True)
                    continue
                if q is None:
                    q = copy.deepcopy(fp)
                    t0 = time.perf_counter()
                    quantize_(q, QuantConfig.for_bits("minmax", bits), MethodContext(calib))
                    print(f"{bits}: MinMax calibration {time.perf_counter() - t0:.0f} s", flush=True)
                path = a.work / f"{key}.onnx"
                t0 = time.perf_counter()
                rep = export_onnx(q, path, part=part, qdq_format=fmt, calib_inputs=part_inputs(q, part, calib))
                export_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                validation = validate_onnx(path, q, part, part_inputs(q, part, val), threads=a.threads)
                row = {"part": part, "variant": f"{bits} {fmt}", "bits": bits, "qdq_format": fmt,
                       "bytes": onnx_bytes(path),
                       "export_seconds": round(export_s, 1), "validate_seconds": round(time.perf_counter() - t0, 1),
                       "ort_layers": rep.get("ort_layers"), "ort_fused_nodes": rep.get("ort_fused_nodes"),
                       "ort_fallback_layers": len(rep.get("ort_fallback_layers") or {}),
                       "output_grid_sqnr_db_worst": rep.get("output_grid_sqnr_db_worst"),
                       "validation": psnr_summary(validation),
                       "validation_no_optimizations": validation["runs"]["no_optimizations"]}
                atomic_write_json(a.work / f"{key}.json", row)
                rows[key] = row
                print(f"{key}: export {export_s:.0f} s, fused {row['ort_fused_nodes']}, vs fake quant "
                      f"{row['validation']['median_vs_fake_quant']}", flush=True)
                if part == "full":  # parity only; the pipeline is timed per part
                    for f in (path, Path(f"{path}.data")):
                        f.unlink(missing_ok=True)
                gc.collect()
        del q
        gc.collect()
    del fp
    gc.collect()

    timing_file = a.work / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    for r in range(a.rounds):
        for key, path in files.items():
            if len(timing.get(key, [])) > r:
                continue
            t = time_in_fresh_process(path, a.threads, a.runs, a.warmup)["inference_ms"]
            timing.setdefault(key, []).append(t["median"])
            atomic_write_json(timing_file, timing)
            print(f"round {r + 1}: {key} median {t['median']:.0f} ms", flush=True)

    def med(key: str) -> float:
        m = sorted(timing[key])
        return m[len(m) // 2]

    ratios = {key: med(key) / med(f"{key.split('__')[0]}__fp32") for key in files if not key.endswith("__fp32")}
    summary = write_summary(a, rows, timing, ratios, med)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=1))


def write_summary(a: argparse.Namespace, rows: dict, timing: dict, ratios: dict, med) -> dict:
    """results.json (issue 18's top-level keys + everything measured) and results.md in ``a.out``."""
    primary = f"{a.pipeline_parity or a.bits.split(',')[0]}_{a.formats.split(',')[0]}"
    full = rows.get(f"full__{primary}")
    tfl_path = a.tflite_results or (a.out / "tflite_pipeline" / "results.json")
    tfl = json.loads(tfl_path.read_text()) if tfl_path.is_file() else None
    tfl_rows = {r["variant"]: r for r in (tfl or {}).get("rows", []) if r["part"] == "full"}
    tfl_ratio = (tfl_rows["w4a4:int8"]["latency_ms"]["median"] / tfl_rows["float"]["latency_ms"]["median"]
                 if {"float", "w4a4:int8"} <= set(tfl_rows) else None)
    tfl_w8 = (tfl_rows.get("w8a8") or {}).get("validation") or {}
    old = json.loads((a.out / "results.json").read_text()) if (a.out / "results.json").is_file() else {}
    summary = {
        "tflite_pipeline_int_over_fp32": tfl_ratio,
        "ort_unet_qdq_over_fp32": ratios.get(f"unet__{primary}"),
        "ort_vae_decoder_qdq_over_fp32": ratios.get(f"vae_decoder__{primary}"),
        "onnx_w4_size_ratio": old.get("onnx_w4_size_ratio"),
        "tflite_w8a8_psnr_vs_fake_quant": tfl_w8.get("median_vs_fake_quant"),
        "ort_w8a8_psnr_vs_fake_quant": (full or {}).get("validation", {}).get("median_vs_fake_quant"),
        "tflite_fp16_vs_fp32_psnr_db_ref": old.get("tflite_fp16_vs_fp32_psnr_db_ref"),
        "definitions": {
            "tflite_pipeline_int_over_fp32": "one-file TFLite pipeline (LQ image → restored image, `restore` signature), W4A4 MinMax "
                                             "in int8 weight containers / float32, median latency, LiteRT XNNPACK (tflite_latency.py rows)",
            "ort_unet_qdq_over_fp32": f"UNet, {primary.replace('_', ' --qdq-format ')} / FP32 ONNX, default ORT CPU session; each file's "
                                      f"median of {a.runs} runs per round, then the upper median over {a.rounds} interleaved rounds "
                                      "(with 2 rounds: the slower one); every variant in ort_ratios",
            "ort_vae_decoder_qdq_over_fp32": "VAE decoder, same variant and timing as the UNet key",
            "tflite_w8a8_psnr_vs_fake_quant": "one-file TFLite pipeline W8A8 vs the PyTorch fake-quant model, dB on [0,1] images",
            "ort_w8a8_psnr_vs_fake_quant": f"whole-pipeline ONNX ({primary.replace('_', ' --qdq-format ')}) in a default ORT session "
                                           "vs the PyTorch fake-quant model, dB on [0,1] images",
        },
        "sources": {**old.get("sources", {}), "tflite_pipeline": str(tfl_path) if tfl else None},
        "not_measured": old.get("not_measured"),  # hand-written reasons for null keys, kept across reruns
        "command": command_line(), "environment": environment(), "preset": a.preset, "threads": a.threads,
        "ort_rows": rows, "ort_timing_medians_ms": timing, "ort_ratios": ratios,
    }
    if tfl_rows:
        summary["tflite_rows"] = {v: {"bytes": r["bytes"], "latency_ms": r["latency_ms"], "validation": r.get("validation")}
                                  for v, r in tfl_rows.items()}
    atomic_write_json(a.out / "results.json", summary)
    lines = [f"# Deployment speed and parity (issue 18), `{a.preset}`", "",
             f"Command: `{summary['command']}`  ", f"Host: {summary['environment'].get('cpu', '?')}, {a.threads} threads", "",
             "| key | value |", "|---|---|"]
    for k, v in summary.items():
        if isinstance(v, (int, float)) or v is None:
            lines.append(f"| `{k}` | {v if v is None else round(v, 3)} |")
    lines += ["", "ONNX Runtime (CPU EP, default session):", "",
              "| part | variant | MB | median ms | / FP32 | fused integer nodes / ort layers | vs fake quant |", "|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        if r["part"] == "full":
            continue
        ms = med(key) if key in timing else None
        fused = r.get("ort_fused_nodes") or {}
        total = sum(v for k, v in fused.items() if k in FUSED_OPS) if fused else None
        val = (r.get("validation") or {}).get("median_vs_fake_quant")
        lines.append(f"| {r['part']} | {r['variant']} | {r['bytes'] / 1e6:.1f} | {ms and round(ms)} | "
                     f"{round(ratios[key], 2) if key in ratios else '–'} | {total if total is not None else '–'} / {r.get('ort_layers') or '–'} | "
                     f"{'–' if val is None else (f'{val:.1f} dB' if r['part'] == 'vae_decoder' else f'max abs {val:.3g}')} |")
    if full:
        lines += ["", f"Whole pipeline ONNX ({full['variant']}) vs fake quant: {full['validation']['median_vs_fake_quant']:.2f} dB "
                  f"(no-optimisation session: {full['validation_no_optimizations']['vs_fake_quant']['median']:.2f} dB)."]
    atomic_write_text(a.out / "results.md", "\n".join(lines) + "\n")
    return summary


if __name__ == "__main__":
    main()
