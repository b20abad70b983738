"""Assemble the evaluation report (report.json + grid.png) for `toolchain eval` and the demo."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from calibration.dataset import CalibrationSet
from toolchain.errors import CheckpointError
from toolchain.eval.accounting import count
from toolchain.eval.evaluate import load_eval_set, resolve_metrics, restore_set, score
from toolchain.eval.grid import save_grid
from toolchain.eval.metrics import METRIC_NOTES
from toolchain.io.atomic import atomic_write_json


def _reference_model_path(args: argparse.Namespace, metas: list[dict]) -> Path:
    from toolchain.commands.common import resolve_model_path

    if args.model is not None:
        return args.model
    for meta in metas:
        src = meta.get("summary", {}).get("source_model")
        if src and Path(src).exists():
            return Path(src)
    return resolve_model_path(None)


def evaluate_to_folder(args: argparse.Namespace) -> dict[str, Any]:
    from toolchain.defaults import device_from_arg
    from toolchain.models.storage import load_model
    from toolchain.quant.checkpoint import load_quantized, read_checkpoint_meta

    requested = [m.strip() for m in args.metrics.split(",") if m.strip()]
    resolve_metrics(requested, args.weights_dir)  # unknown names fail before any model is loaded
    device = device_from_arg(args.device)
    metas = [read_checkpoint_meta(c) for c in args.checkpoint]
    data = CalibrationSet.open(args.data)
    fp_model = load_model(_reference_model_path(args, metas), args.preset).to(device)
    size = fp_model.image_size
    lq_batches, lq, hq = load_eval_set(data, size, args.limit, args.batch_size, getattr(fp_model.config, "upscale", 1))
    metric_names, skipped = resolve_metrics(requested, args.weights_dir, int(min(hq.shape[-2:])))
    acc_size = args.accounting_size or size
    example = torch.zeros(1, 3, acc_size, acc_size, device=device)

    fp_out = restore_set(fp_model, lq_batches, device, "FP")
    results: dict[str, Any] = {
        "LQ input": {"vs_hq": score(lq, hq, metric_names, args.weights_dir)},
        "FP": {"vs_hq": score(fp_out, hq, metric_names, args.weights_dir), "accounting": count(fp_model, example).to_dict(per_layer=False)},
    }
    columns = {"LQ": lq, "FP": fp_out}
    for ckpt, meta in zip(args.checkpoint, metas):
        qmodel, _ = load_quantized(ckpt, device)
        if qmodel.image_size != size:
            raise CheckpointError(f"{ckpt} is for {qmodel.image_size}px input, the reference model for {size}px")
        label = f"{meta['quant_config']['method']} {_bits_label(meta)}"
        if label in results:
            label = f"{label} ({ckpt.name})"
        out = restore_set(qmodel, lq_batches, device, label)
        results[label] = {
            "checkpoint": str(ckpt),
            "vs_hq": score(out, hq, metric_names, args.weights_dir),
            "vs_fp": score(out, fp_out, metric_names, args.weights_dir),
            "accounting": count(qmodel, example).to_dict(per_layer=False),
            "summary": meta.get("summary", {}),
        }
        columns[label] = out
    columns["HQ"] = hq
    report = {
        "data": {"path": str(args.data), "images": int(lq.shape[0]), "size": size, "manifest_seed": data.manifest.get("seed")},
        "metrics": metric_names,
        "skipped_metrics": skipped,
        "metric_notes": dict(METRIC_NOTES),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    captions = {k: [f"{v:.2f} dB" for v in results[_result_key(k)]["vs_hq"]["psnr_per_image"]] for k in columns if _result_key(k) in results and "psnr" in metric_names}
    save_grid(args.out / "grid.png", columns, captions, max_rows=args.grid_rows)
    atomic_write_json(args.out / "report.json", report)
    return report


def _result_key(column: str) -> str:
    return {"LQ": "LQ input"}.get(column, column)


def _bits_label(meta: dict) -> str:
    """W/A bits as the paper writes them; mixed precision shows the element-weighted average (A3.98)."""
    layers = meta.get("layers", {})
    mp = meta.get("summary", {}).get("mp_table")
    w = [d["w_bits"] for d in layers.values() if d.get("w_bits")]
    a = [d["a_bits"] for d in layers.values() if d.get("a_bits")]
    if not w:
        return "FP"
    fmt = lambda xs: str(xs[0]) if len(set(xs)) == 1 else f"{sum(xs) / len(xs):.2f}"  # noqa: E731
    a_label = f"{mp['average_a_bits']:.2f}-MP" if mp else (fmt(a) if a else "32")
    return f"W{fmt(w)}A{a_label}"
