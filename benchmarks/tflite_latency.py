"""LiteRT host latency and size: float TFLite vs integer TFLite, in one run on one CPU.

For each model part and each variant (``float``, or ``<bits>[:<weight container>]`` such as ``w8a8``,
``w4a4`` (int4 weights) or ``w4a4:int8`` (the same 4-bit integers stored in int8)) the model is
MinMax-quantized (random init is fine for timing and size), exported with ``export_tflite`` (integer
recipe with the checkpoint's own ranges) and timed with the LiteRT Python interpreter (XNNPACK on, same
threads / warm-up / runs for all, each timed in a fresh process). Every finished row is kept in ``--work`` and the tables are rewritten
after each row, so an interrupted run resumes where it stopped. The numbers describe this host's CPU,
not a phone; for a phone use ``toolchain profile MODEL --adb``.

    python benchmarks/tflite_latency.py --preset tiny --variants float,w8a8,w4a8,w4a4,w4a4:int8 --out benchmarks/results/tflite_tiny
    python benchmarks/tflite_latency.py --preset osdface --parts unet,vae_decoder --variants float,w4a4:int8,w8a8,w4a4 \\
        --threads 16 --runs 3 --warmup 1 --images 1 --out benchmarks/results/tflite_osdface

On a 24 GB machine at 512 px, export first and time afterwards in a second process (the exporter's heap and a
timed interpreter of the same model do not fit together):

    python benchmarks/tflite_latency.py --preset osdface --parts full --variants float,w4a4:int8,w8a8 --lean --defer-timing \
        --images 1 --validate-images 1 --work /tmp/dsp/tfl --out benchmarks/results/deploy_speed/tflite_pipeline
    python benchmarks/tflite_latency.py --retime-only --rounds 2 --runs 3 --warmup 1 --threads 2 --parts full \
        --variants float,w4a4:int8,w8a8 --work /tmp/dsp/tfl --out benchmarks/results/deploy_speed/tflite_pipeline
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
from toolchain.export.parts import part_inputs  # noqa: E402
from toolchain.export.tflite_backend import export_tflite, validate_tflite  # noqa: E402
from toolchain.defaults import DEFAULT_MODEL  # noqa: E402
from toolchain.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from toolchain.quant.registry import MethodContext  # noqa: E402
from toolchain.models import build_model, load_model, preset  # noqa: E402
from toolchain.quant.api import quantize_  # noqa: E402
from toolchain.quant.config import QuantConfig  # noqa: E402


def parse_variant(text: str) -> tuple[str | None, str]:
    """'float' → (None, 'auto'); 'w4a4:int8' → ('w4a4', 'int8')."""
    bits, _, container = text.partition(":")
    return (None if bits == "float" else bits), (container or "auto")


def row_stem(part: str, label: str) -> str:
    """File stem of a row's JSON and .tflite in --work ('unet__w4a4_int8')."""
    return f"{part}__{label.replace(':', '_')}"


def quantized_copy(fp: torch.nn.Module, bits: str, batches: list[torch.Tensor], device: torch.device) -> torch.nn.Module:
    model = copy.deepcopy(fp).to(device)
    quantize_(model, QuantConfig.for_bits("minmax", bits), MethodContext([b.to(device) for b in batches], device=device))
    return model.cpu()


def profile_in_fresh_process(path: Path, threads: int, runs: int, warmup: int) -> dict:
    """Time a .tflite in a new interpreter process: the exporter's thread pools and heap (torch, the quantizer's
    calibration interpreter) otherwise skew small models by tens of percent."""
    code = ("import json, sys; from toolchain.profile.host import profile_tflite; "
            "print(json.dumps(profile_tflite(sys.argv[1], threads=int(sys.argv[2]), runs=int(sys.argv[3]), warmup=int(sys.argv[4]))))")
    done = subprocess.run([sys.executable, "-c", code, str(path), str(threads), str(runs), str(warmup)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_tables(rows: list[dict], args: argparse.Namespace, size: int, out: Path, origin: dict | None = None) -> None:
    """results.json / results.md; ``origin`` (command and environment of the run that measured the rows) is kept
    when the tables are rebuilt elsewhere with --report-only."""
    origin = origin or {"command": command_line(), "environment": environment()}
    result = {**origin, "model": str(args.preset or args.model), "image_size": size,
              "threads": args.threads, "runs": args.runs, "warmup": args.warmup, "rows": rows}
    atomic_write_json(out / "results.json", result)
    lines = [f"# LiteRT host latency: float vs integer TFLite ({result['model']}, {size}px)", "",
             f"Command: `{result['command']}`  ", f"Host: {result['environment'].get('cpu', '?')}, {args.threads} threads, XNNPACK on, "
             f"{args.warmup} warm-up + {args.runs} runs" + (f", median / min / max over {args.rounds} interleaved rounds" if args.rounds > 1 else ""), "",
             "| part | variant | file MB | vs float size | median ms | min ms | max ms | vs float latency | vs fake-quant (PSNR or max abs) | export s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    floats = {r["part"]: r for r in rows if r["variant"] == "float"}
    for r in rows:
        fl = floats.get(r["part"])
        lat = r["latency_ms"]
        rel_size = f"{r['bytes'] / fl['bytes']:.3f}" if fl else "–"
        rel_lat = f"{lat['median'] / fl['latency_ms']['median']:.2f}" if fl else "–"
        val = r.get("validation") or {}
        psnr = f"{val['median_vs_fake_quant']:.1f} dB" if val.get("metric") == "psnr_db" else \
            (f"max abs {val['median_vs_fake_quant']:.3g}" if val else "–")
        lines.append(f"| {r['part']} | {r['variant']} | {r['bytes'] / 1e6:.1f} | {rel_size} | {lat['median']:.1f} | {lat['min']:.1f} | "
                     f"{lat['max']:.1f} | {rel_lat} | {psnr} | {r['export_seconds']:.0f} |")
    parts = sorted({r["part"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    if len(parts) > 1:
        lines += ["", f"Sum over parts ({', '.join(parts)}; a variant is summed only where every part has it):", "",
                  "| variant | file MB | median ms | vs float latency |", "|---|---|---|---|"]
        by = {(r["part"], r["variant"]): r for r in rows}
        total_float = sum(by[(p, "float")]["latency_ms"]["median"] for p in parts) if all((p, "float") in by for p in parts) else None
        for v in variants:
            if not all((p, v) in by for p in parts):
                continue
            ms = sum(by[(p, v)]["latency_ms"]["median"] for p in parts)
            mb = sum(by[(p, v)]["bytes"] for p in parts) / 1e6
            lines.append(f"| {v} | {mb:.1f} | {ms:.1f} | {ms / total_float:.2f} |" if total_float else f"| {v} | {mb:.1f} | {ms:.1f} | – |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="float model (default: bundled reference model)")
    ap.add_argument("--preset", default=None, help="use a random-init preset instead of --model")
    ap.add_argument("--parts", default="full", help="comma-separated parts (full, unet, vae_encoder, vae_decoder, embedder)")
    ap.add_argument("--variants", default="float,w8a8,w4a4", help="float and/or <bits>[:auto|int8]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--images", type=int, default=4, help="calibration images (op-output ranges and MinMax)")
    ap.add_argument("--validate-images", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="> 1: afterwards re-time all variants in this many interleaved rounds")
    ap.add_argument("--lean", action="store_true", help="keep one full model in memory (rebuild the float one per row); "
                    "lets the osdface UNet export fit a 24 GB machine")
    ap.add_argument("--keep-files", action="store_true", help="keep the .tflite files in --work (default: delete after timing)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tflite_latency"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--defer-timing", action="store_true", help="export and validate only, keeping the files; time them later with "
                    "--retime-only (at 512 px the exporter's heap and a timed interpreter do not fit 24 GB together)")
    ap.add_argument("--retime-only", action="store_true", help="time the files kept in --work in --rounds interleaved rounds and write "
                    "the tables (no model is built)")
    ap.add_argument("--report-only", type=Path, default=None, metavar="RESULTS_JSON",
                    help="rebuild the tables from the rows in --work, keeping command and environment from this results.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows_dir = args.work / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    if args.retime_only:
        order = {v: i for i, v in enumerate(args.variants.split(","))}
        parts = args.parts.split(",")
        rows = sorted((json.loads(f.read_text()) for f in rows_dir.glob("*.json")),
                      key=lambda r: (parts.index(r["part"]) if r["part"] in parts else 99, order.get(r["variant"], 99)))
        if not rows:
            raise SystemExit(f"error: no exported rows in {rows_dir} (run with --defer-timing first)")
        retime_interleaved(rows, args)
        missing = [row_stem(r["part"], r["variant"]) for r in rows if not r.get("latency_ms")]
        if missing:
            raise SystemExit(f"error: no .tflite kept in {args.work} for {', '.join(missing)}")
        for r in rows:
            atomic_write_json(rows_dir / f"{row_stem(r['part'], r['variant'])}.json", r)
        write_tables(rows, args, rows[0].get("image_size") or 0, args.out)
        return
    if args.report_only:
        measured = json.loads(args.report_only.read_text())
        for key in ("threads", "runs", "warmup"):
            setattr(args, key, measured[key])
        order = {v: i for i, v in enumerate(args.variants.split(","))}
        rows = sorted((json.loads(f.read_text()) for f in rows_dir.glob("*.json")),
                      key=lambda r: (args.parts.split(",").index(r["part"]) if r["part"] in args.parts.split(",") else 99, order.get(r["variant"], 99)))
        write_tables(rows, args, measured["image_size"], args.out, {k: measured[k] for k in ("command", "environment")})
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load_fp = lambda: build_model(preset(args.preset), seed=0) if args.preset else load_model(args.model)  # noqa: E731
    fp = load_fp()
    size = fp.config.image_size
    calib = build_calibration_set([BUNDLED_FACES], args.work / "calib", n=args.images, size=size, seed=0, progress=False)
    batches = CalibrationSet.open(calib).batches(size, 1)
    variants = [parse_variant(v) for v in args.variants.split(",")]
    rows = []
    for part in args.parts.split(","):
        for bits, container in variants:
            label = "float" if bits is None else (bits if container == "auto" else f"{bits}:{container}")
            row_file = rows_dir / f"{row_stem(part, label)}.json"
            if row_file.is_file():
                rows.append(json.loads(row_file.read_text()))
                print(f"{part} {label}: kept from an earlier run", flush=True)
                continue
            t0 = time.perf_counter()
            if args.lean and fp is None:
                fp = load_fp()
            model = quantized_copy(fp, bits, batches, device) if bits else fp
            if args.lean and bits:
                fp = None  # rebuilt (same seed / same file) for the next row: one full model in memory, not two
                gc.collect()
            quantize_s = time.perf_counter() - t0
            samples = part_inputs(model, part, batches)
            path = args.work / f"{row_stem(part, label)}.tflite"
            t1 = time.perf_counter()
            rep = export_tflite(model, path, part=part, calib_inputs=samples if bits else None, weight_container=container)
            if bits:
                rep["validation"] = validate_tflite(path, model, part, samples[: args.validate_images])
            export_s = time.perf_counter() - t1
            prof = {} if args.defer_timing else profile_in_fresh_process(path, args.threads, args.runs, args.warmup)
            row = {"part": part, "variant": label, "bits": bits, "weight_container": container, "bytes": path.stat().st_size,
                   "image_size": size, "latency_ms": prof.get("inference_ms"), "init_ms": prof.get("init_ms"),
                   "quantize_seconds": round(quantize_s, 1),
                   "export_seconds": round(export_s, 1), "validation": {k: v for k, v in (rep.get("validation") or {}).items() if k != "per_image"},
                   "integer_layers": rep.get("layers_quantized"), "float_fallback_layers": rep.get("float_fallback_layers"),
                   "weight_grid_mismatches": rep.get("weight_grid_mismatches"), "scale_mismatches": rep.get("scale_mismatches"),
                   "int4_weight_layers": rep.get("int4_weight_layers"), "int8_weight_layers": rep.get("int8_weight_layers"),
                   "ops": rep.get("ops")}
            atomic_write_json(row_file, row)
            rows.append(row)
            Path(rep["float_path"]).unlink(missing_ok=True)  # the float flavour the integer file was made from
            if not (args.keep_files or args.rounds > 1 or args.defer_timing):
                path.unlink(missing_ok=True)
            print(f"{part} {label}: {row['bytes'] / 1e6:.1f} MB, "
                  + (f"median {row['latency_ms']['median']:.1f} ms, " if row["latency_ms"] else "") + f"export {export_s:.0f} s", flush=True)
            if not args.defer_timing:
                write_tables(rows, args, size, args.out)
            del model
            gc.collect()
    if args.defer_timing:
        print(f"exported {len(rows)} rows into {args.work}; time them with --retime-only", flush=True)
        return
    if args.rounds > 1:
        retime_interleaved(rows, args)
    write_tables(rows, args, size, args.out)


def retime_interleaved(rows: list[dict], args: argparse.Namespace) -> None:
    """Time every kept file again in ``--rounds`` interleaved rounds (float, a, b, …, float, a, b, …), each in a
    fresh process, and report the median over rounds: host drift then hits every variant alike."""
    files = {id(r): args.work / f"{row_stem(r['part'], r['variant'])}.tflite" for r in rows}
    medians: dict[int, list[float]] = {id(r): [] for r in rows}
    for _ in range(args.rounds):
        for r in rows:
            if files[id(r)].is_file():
                medians[id(r)].append(profile_in_fresh_process(files[id(r)], args.threads, args.runs, args.warmup)["inference_ms"]["median"])
    for r in rows:
        m = sorted(medians[id(r)])
        if m:
            r["latency_rounds_median_ms"] = m
            r["latency_ms"] = {**(r.get("latency_ms") or {}), "median": m[len(m) // 2], "min": m[0], "max": m[-1],
                               "note": f"median / min / max over {len(m)} interleaved rounds of {args.runs} runs"}


if __name__ == "__main__":
    main()
