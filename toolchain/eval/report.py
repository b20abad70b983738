"""Assemble the evaluation report (report.json + grid.png) for `toolchain eval` and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from toolchain.calibration.dataset import CalibrationSet
from toolchain.defaults import resolve_model_path
from toolchain.errors import CheckpointError
from toolchain.eval.accounting import count
from toolchain.eval.evaluate import load_eval_set, resolve_metrics, restore_set, score
from toolchain.eval.grid import save_grid
from toolchain.eval.metrics import METRIC_NOTES
from toolchain.io.atomic import atomic_write_json

DEFAULT_METRICS = "psnr,ssim,st_lpips,identity_deg,lmd,niqe,fd_stlpips,lpips,fid"


def _reference_model_path(model: Path | None, metas: list[dict]) -> Path:
    if model is not None:
        return model
    for meta in metas:
        src = meta.get("summary", {}).get("source_model")
        if src and Path(src).exists():
            return Path(src)
    return resolve_model_path(None)


def evaluate_to_folder(data: Path, checkpoints: list[Path], out: Path, *, model: Path | None = None, preset: str | None = None,
                       metrics: str | list[str] = DEFAULT_METRICS, weights_dir: Path | None = None, device: str = "auto",
                       limit: int | None = None, batch_size: int = 4, accounting_size: int | None = None,
                       grid_rows: int = 4) -> dict[str, Any]:
    """Score the float model and each quantized checkpoint on an HQ/LQ set; write ``out/report.json`` and ``out/grid.png``.

    data: a calibration/eval set folder (``toolchain calibrate``); checkpoints: quantized checkpoint folders;
    model: the float reference (default: the first checkpoint's recorded source model, else the bundled one);
    metrics: names of ``toolchain.eval.metrics`` (comma string or list; one that cannot run is skipped with the
    reason in ``skipped_metrics``); limit: first N images; accounting_size: input side (px) for params/BOPs
    accounting (default: the model's). Returns the report dict (also written). Raises ConfigError for unknown
    metric names (before any model loads) and CheckpointError when a checkpoint's input size differs from the
    reference model's.
    """
    from toolchain.defaults import device_from_arg
    from toolchain.models.storage import load_model
    from toolchain.quant.checkpoint import load_quantized, read_checkpoint_meta

    requested = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    resolve_metrics(requested, weights_dir)  # unknown names fail before any model is loaded
    dev = device_from_arg(device)
    metas = [read_checkpoint_meta(c) for c in checkpoints]
    dataset = CalibrationSet.open(data)
    fp_model = load_model(_reference_model_path(model, metas), preset).to(dev)
    size = fp_model.image_size
    lq_batches, lq, hq = load_eval_set(dataset, size, limit, batch_size, getattr(fp_model.config, "upscale", 1))
    metric_names, skipped = resolve_metrics(requested, weights_dir, int(min(hq.shape[-2:])))
    acc_size = accounting_size or size
    example = torch.zeros(1, 3, acc_size, acc_size, device=dev)

    fp_out = restore_set(fp_model, lq_batches, dev, "FP")
    results: dict[str, Any] = {
        "LQ input": {"vs_hq": score(lq, hq, metric_names, weights_dir)},
        "FP": {"vs_hq": score(fp_out, hq, metric_names, weights_dir), "accounting": count(fp_model, example).to_dict(per_layer=False)},
    }
    columns = {"LQ": lq, "FP": fp_out}
    for ckpt, meta in zip(checkpoints, metas):
        qmodel, _ = load_quantized(ckpt, dev)
        if qmodel.image_size != size:
            raise CheckpointError(f"{ckpt} is for {qmodel.image_size}px input, the reference model for {size}px")
        label = f"{meta['quant_config']['method']} {_bits_label(meta)}"
        if label in results:
            label = f"{label} ({ckpt.name})"
        restored = restore_set(qmodel, lq_batches, dev, label)
        results[label] = {
            "checkpoint": str(ckpt),
            "vs_hq": score(restored, hq, metric_names, weights_dir),
            "vs_fp": score(restored, fp_out, metric_names, weights_dir),
            "accounting": count(qmodel, example).to_dict(per_layer=False),
            "summary": meta.get("summary", {}),
        }
        columns[label] = restored
    columns["HQ"] = hq
    report = {
        "data": {"path": str(data), "images": int(lq.shape[0]), "size": size, "manifest_seed": dataset.manifest.get("seed")},
        "metrics": metric_names,
        "skipped_metrics": skipped,
        "metric_notes": dict(METRIC_NOTES),
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    captions = {k: [f"{v:.2f} dB" for v in results[_result_key(k)]["vs_hq"]["psnr_per_image"]] for k in columns if _result_key(k) in results and "psnr" in metric_names}
    save_grid(out / "grid.png", columns, captions, max_rows=grid_rows)
    atomic_write_json(out / "report.json", report)
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
