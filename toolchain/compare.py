"""Method comparison: quantize → restore → evaluate for methods × bit settings, one table.

A spec (JSON) lists runs: ``{"label", "method", "params", "bits": [...], "mp": {...}?}``. Each
(run, bits) is quantized once into ``<work>/<label>-<bits>/`` (reused on a rerun, so an
interrupted comparison resumes), restored on the held-out set and scored against HQ and against
the float model. ``mp`` runs first quantize uniformly, allocate activation bits under the
uniform-A budget of the same bits, and re-quantize with the table (QuantFace-MP).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from calibration.dataset import CalibrationSet
from toolchain.eval.accounting import count
from toolchain.eval.evaluate import load_eval_set, restore_set, score
from toolchain.eval.grid import save_grid
from toolchain.io.atomic import atomic_write_json, atomic_write_text
from toolchain.io.resume import prepare_workdir
from toolchain.io.weights import load_tensors, save_tensors
from toolchain.methods.registry import MethodContext
from toolchain.models.storage import load_model
from toolchain.quant.api import quantize_
from toolchain.quant.checkpoint import load_quantized, save_quantized
from toolchain.quant.config import QuantConfig

METRICS = ["psnr", "ssim", "st_lpips", "fd_stlpips"]


def validate_spec(spec: Any, where: str = "comparison spec") -> list[dict[str, Any]]:
    """Check a comparison spec's shape before any compute: a JSON list of objects with ``label`` (str),
    ``method`` (str), ``bits`` (list of 'wXaY'), optional ``params`` (object), ``mp`` (object) and
    ``calib_batches`` (int >= 1). Returns the spec; raises ConfigError naming the first problem."""
    from toolchain.errors import ConfigError
    from toolchain.quant.config import parse_bits

    if not isinstance(spec, list) or not spec:
        kind = "null" if spec is None else type(spec).__name__
        raise ConfigError(f"{where} must be a non-empty JSON list of runs like "
                          f'[{{"label": "MinMax", "method": "minmax", "bits": ["w4a4"]}}], not a {kind}')
    for i, run in enumerate(spec):
        if not isinstance(run, dict):
            raise ConfigError(f"{where}: entry {i} must be an object, not {type(run).__name__}")
        for key, typ in (("label", str), ("method", str), ("bits", list)):
            if not isinstance(run.get(key), typ):
                raise ConfigError(f"{where}: entry {i} needs '{key}' as a {typ.__name__}")
        for b in run["bits"]:
            if not isinstance(b, str):
                raise ConfigError(f"{where}: entry {i} bits must be strings like 'w4a4'")
            parse_bits(b)
        for key in ("params", "mp"):
            if key in run and not isinstance(run[key], dict):
                raise ConfigError(f"{where}: entry {i} '{key}' must be an object")
        cb = run.get("calib_batches")
        if cb is not None and (not isinstance(cb, int) or isinstance(cb, bool) or cb < 1):
            raise ConfigError(f"{where}: entry {i} 'calib_batches' must be an integer >= 1")
    return spec


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-").lower()


def _quantize(model_path: Path, method: str, bits: str, params: dict, calib: list[torch.Tensor], out: Path, work: Path,
              device: torch.device, rules: list | None = None, calib_batches: int | None = None) -> dict:
    fields = [str(model_path), method, bits, params, [r.to_dict() for r in rules or []]] + ([calib_batches] if calib_batches else [])
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    stamp = out / "spec_key.txt"
    if (out / "quant_config.json").is_file() and stamp.is_file() and stamp.read_text() == key:
        return json.loads((out / "quant_config.json").read_text())["summary"]
    model = load_model(model_path).to(device)
    cfg = QuantConfig.for_bits(method, bits, params=dict(params))
    if rules:
        cfg.rules += rules
        from toolchain.quant.config import quantizable_layers

        cfg.check_matches([n for n, _ in quantizable_layers(model)])
    workdir = work / f".{out.name}.work"
    prepare_workdir(workdir, {"spec_key": key, "calibration_batches": len(calib)})  # never resume another spec's state
    summary = quantize_(model, cfg, MethodContext(calib, workdir=workdir, device=device))
    save_quantized(model.cpu(), cfg, out, summary)
    stamp.write_text(key)
    return summary


def run_comparison(spec: list[dict[str, Any]], model_path: Path, calib_dir: Path, eval_dir: Path, out: Path, work: Path,
                   device: torch.device, batch_size: int = 8, name: str = "compare") -> dict[str, Any]:
    fp = load_model(model_path).to(device)
    size = fp.image_size
    calib = CalibrationSet.open(calib_dir).batches(size, 4)
    ev = CalibrationSet.open(eval_dir)
    lq_batches, lq, hq = load_eval_set(ev, size, None, batch_size, getattr(fp.config, "upscale", 1))
    fp_out = restore_set(fp, lq_batches, device, "FP")
    example = torch.zeros(1, 3, size, size, device=device)
    rows: list[dict[str, Any]] = [
        {"label": "LQ input", "bits": "-", "vs_hq": score(lq, hq, METRICS)},
        {"label": "FP", "bits": "W32A32", "vs_hq": score(fp_out, hq, METRICS), "accounting": count(fp, example).to_dict(per_layer=False)},
    ]
    grids: dict[str, dict[str, torch.Tensor]] = {}
    for run in spec:
        for bits in run["bits"]:
            label = run["label"]
            ck = work / _slug(f"{label}-{bits}")
            t0 = time.perf_counter()
            run_calib = calib[: run["calib_batches"]] if run.get("calib_batches") else calib  # a per-run compute budget
            summary = _quantize(model_path, run["method"], bits, run.get("params", {}), run_calib, ck, work, device,
                                calib_batches=run.get("calib_batches"))
            bits_label = bits.upper()
            if run.get("mp"):
                from toolchain.alloc.allocate import SolveSettings, build_table, parse_pin
                from toolchain.alloc.errors import error_table
                from toolchain.alloc.sensitivity import SweepSettings, run_sensitivity
                from toolchain.alloc.table import table_rules

                mp = run["mp"]
                alloc_dir = work / _slug(f"{label}-{bits}-alloc")
                sens = run_sensitivity(ck, calib_dir, alloc_dir, SweepSettings(metric=mp.get("metric", "st_lpips"), epsilon=mp.get("epsilon", 0.02),
                                                                            images=mp.get("images", 4)), mp.get("workers", 1), str(device))
                errs = error_table(ck, calib_dir, mp.get("bits", [3, 4, 5, 6]), images=mp.get("images", 4), device=str(device))
                a = int(bits.lower().split("a")[1])
                table = build_table(sens, errs, SolveSettings(budget_bits=float(a), pins=[parse_pin(p) for p in mp.get("pins", [])]), str(ck), alloc_dir,
                                    {"metric": next(iter(sens.values()))["metric"], "epsilon": mp.get("epsilon", 0.02)})
                ck = work / _slug(f"{label}-{bits}-mp")
                summary = _quantize(model_path, run["method"], bits, run.get("params", {}), run_calib, ck, work, device, table_rules(table),
                                    calib_batches=run.get("calib_batches"))
                bits_label = f"W{bits.lower().split('a')[0][1:]}A{table['average_a_bits']:.2f}"
            cached = _cached_eval(ck, model_path, eval_dir)
            if cached is not None:
                row, out_imgs = cached
            else:
                model, _ = load_quantized(ck, device)
                out_imgs = restore_set(model, lq_batches, device, f"{label} {bits}")
                row = {"label": label, "method": run["method"], "params": run.get("params", {}), "bits": bits_label, "checkpoint": str(ck),
                       "calibration_images": sum(int(b.shape[0]) for b in run_calib),
                       "vs_hq": score(out_imgs, hq, METRICS), "vs_fp": score(out_imgs, fp_out, METRICS),
                       "accounting": count(model, example).to_dict(per_layer=False), "seconds": round(time.perf_counter() - t0, 1),
                       "summary": {k: v for k, v in summary.items() if k in ("quantized_layers", "balance", "lowrank", "seconds", "trq")}}
                _store_eval(ck, model_path, eval_dir, row, out_imgs)
            rows.append(row)
            grids.setdefault(bits, {"LQ": lq, "FP": fp_out})[label] = out_imgs
            print(f"{label:>28} {bits_label:>9}: PSNR {row['vs_hq']['psnr']:.2f}  ST-LPIPS {row['vs_hq']['st_lpips']:.4f}  "
                  f"| vs FP PSNR {row['vs_fp']['psnr']:.2f}", flush=True)
            _write(rows, out, name, model_path, calib_dir, eval_dir)
    for bits, cols in grids.items():
        cols["HQ"] = hq
        save_grid(out / f"{name}_grid_{bits}.png", cols, max_rows=4, cell=128)
    return _write(rows, out, name, model_path, calib_dir, eval_dir)


def _eval_key(ck: Path, model_path: Path, eval_dir: Path) -> str:
    """Evaluation of one checkpoint on one eval set: tied to the checkpoint's spec key and the metrics."""
    spec_key = (ck / "spec_key.txt").read_text() if (ck / "spec_key.txt").is_file() else ""
    return hashlib.sha256(json.dumps([spec_key, str(model_path), str(Path(eval_dir).resolve()), METRICS]).encode()).hexdigest()[:12]


def _cached_eval(ck: Path, model_path: Path, eval_dir: Path) -> tuple[dict[str, Any], torch.Tensor] | None:
    """A rerun reuses each checkpoint's scores and restored images, so one command rebuilds the whole table cheaply."""
    key = _eval_key(ck, model_path, eval_dir)
    row_path, img_path = ck / f"eval-{key}.json", ck / f"eval-{key}.safetensors"
    if not (row_path.is_file() and img_path.is_file()):
        return None
    return json.loads(row_path.read_text()), load_tensors(img_path)["images"].float()


def _store_eval(ck: Path, model_path: Path, eval_dir: Path, row: dict[str, Any], images: torch.Tensor) -> None:
    key = _eval_key(ck, model_path, eval_dir)
    save_tensors(ck / f"eval-{key}.safetensors", {"images": images.detach().cpu().to(torch.float16).contiguous()})
    atomic_write_json(ck / f"eval-{key}.json", row)


def _bits_rank(row: dict[str, Any]) -> tuple[float, float]:
    """LQ, FP, then W8A8 > W6A6 > W4A6 > W4A4 > W4A3.98 (MP)."""
    m = re.fullmatch(r"W(\d+)A([\d.]+)", str(row["bits"]))
    if not m:
        return (-1e9, 0.0)
    return (-float(m.group(1)), -float(m.group(2)))


def _write(rows: list[dict[str, Any]], out: Path, name: str, model_path: Path, calib: Path, ev: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model": str(model_path), "calibration": str(calib), "eval": str(ev), "metrics": METRICS, "rows": rows}
    atomic_write_json(out / f"{name}.json", doc)
    head = ("| Bits | Method | PSNR↑ | SSIM↑ | ST-LPIPS↓ | FD-STLPIPS↓ | PSNR vs FP↑ | ST-LPIPS vs FP↓ | Params (M, paper conv.) | Ops (G, paper conv.) | Size (MB, honest) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in sorted(rows, key=_bits_rank):  # grouped by bit setting as in the paper's Table 1; stable within a group
        h, f = r["vs_hq"], r.get("vs_fp", {})
        acc = r.get("accounting", {})
        lines.append(f"| {r['bits']} | {r['label']} | {h['psnr']:.2f} | {h['ssim']:.4f} | {h['st_lpips']:.4f} | {h.get('fd_stlpips', float('nan')):.4f} | "
                     + (f"{f['psnr']:.2f} | {f['st_lpips']:.4f} | " if f else "– | – | ")
                     + (f"{acc['paper']['params_M']:.2f} | {acc['paper']['ops_G']:.2f} | {acc['honest']['size_MB']:.2f} |" if acc else "– | – | – |"))
    atomic_write_text(out / f"{name}.md", "\n".join(lines) + "\n")
    return doc
