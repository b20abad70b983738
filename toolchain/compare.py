"""Method comparison: quantize → restore → evaluate for methods × bit settings, one table.

A spec (JSON) lists runs: ``{"label", "method", "params", "bits": [...], "mp": {...}?}``. Each
(run, bits) is quantized once into ``<work>/<label>-<bits>/`` (reused on a rerun, so an
interrupted comparison resumes), restored on the held-out set and scored against HQ and against
the float model. ``mp`` runs first quantize uniformly, allocate activation bits under the
uniform-A budget of the same bits, and re-quantize with the table (QuantFace-MP).

Besides PSNR/SSIM/ST-LPIPS/FD-STLPIPS every row carries the face metrics of ``toolchain eval``
(``identity_deg``, ``lmd`` vs HQ and vs FP; ``niqe`` of the output) where they can run. Where one
cannot, the row says why instead of a number: the whole table when its packages are missing or the
images are below NIQE's 96 px (``skipped_metrics``), one comparison when dlib's detector finds no
face in any of its reference images (``vs_hq``/``vs_fp`` → ``missing``).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from toolchain.calibration.dataset import CalibrationSet
from toolchain.eval.accounting import count
from toolchain.eval.evaluate import load_eval_set, resolve_metrics, restore_set, score
from toolchain.eval.grid import save_grid
from toolchain.io.atomic import atomic_directory, atomic_write_json, atomic_write_text
from toolchain.io.hashing import sha256_file
from toolchain.io.resume import prepare_workdir
from toolchain.quant.registry import MethodContext
from toolchain.models.storage import load_model
from toolchain.quant.api import quantize_
from toolchain.quant.checkpoint import load_quantized, save_quantized
from toolchain.quant.config import QuantConfig

METRICS = ["psnr", "ssim", "st_lpips", "fd_stlpips"]  # always scored
FACE_METRICS = ["identity_deg", "lmd", "niqe"]  # scored where they can run, else reported missing with the reason
DETECTED_METRICS = ("identity_deg", "lmd")  # measured inside dlib's face box on the reference image


def metric_plan(image_size: int) -> tuple[list[str], dict[str, str]]:
    """The metrics a comparison at ``image_size`` px scores: ``METRICS`` plus each of ``FACE_METRICS``
    that can run here, and {metric: reason} for the others (packages absent, NIQE below 96 px)."""
    usable, skipped = resolve_metrics(FACE_METRICS, None, image_size)
    return METRICS + usable, skipped


def score_vs(pred: torch.Tensor, ref: torch.Tensor, metrics: list[str], copy_from: dict[str, Any] | None = None) -> dict[str, Any]:
    """``evaluate.score`` of ``pred`` against ``ref`` (NCHW in [0, 1]) with the face-detection rule of the table.

    ``identity_deg``/``lmd`` are computed exactly as ``toolchain eval`` computes them; ``faces_detected``
    records in how many reference images dlib's detector found a face (the others use the whole crop as
    the box). When it finds none at all, the two metrics are not scored and ``missing`` holds the reason.
    ``copy_from``: an earlier result of the same ``pred`` whose no-reference metrics (``niqe``) are reused."""
    names, missing, extra = list(metrics), {}, {}
    if copy_from is not None:
        from toolchain.eval.metrics import NO_REFERENCE_METRICS

        for m in NO_REFERENCE_METRICS:
            if m in names and m in copy_from:
                names.remove(m)
                extra[m], extra[m + "_per_image"] = copy_from[m], copy_from[m + "_per_image"]
    if any(m in DETECTED_METRICS for m in names):
        from toolchain.eval.face import faces_found

        found = sum(faces_found(ref))
        extra["faces_detected"] = found
        if found == 0:
            why = (f"dlib's HOG face detector found no face in any of the {len(ref)} reference images ({ref.shape[-1]} px; "
                   "its window is 80 px), so there is no face to measure")
            missing = {m: why for m in names if m in DETECTED_METRICS}
            names = [m for m in names if m not in DETECTED_METRICS]
    out = score(pred, ref, names)
    out.update(extra)
    if missing:
        out["missing"] = missing
    return out


def validate_spec(spec: Any, where: str = "comparison spec") -> list[dict[str, Any]]:
    """Check a comparison spec's shape before any compute: a JSON list of objects with ``label`` (str),
    ``method`` (str), ``bits`` (list of 'wXaY'), optional ``params`` (object), ``mp`` (object) and
    ``calib_batches`` (int >= 1). Returns the spec; raises ConfigError naming the first problem."""
    from toolchain.errors import ConfigError
    from toolchain.quant.config import parse_bits

    if not isinstance(spec, list) or not spec:
        kind = "an empty list" if spec == [] else "null" if spec is None else f"a {type(spec).__name__}"
        raise ConfigError(f"{where} must be a non-empty JSON list of runs like "
                          f'[{{"label": "MinMax", "method": "minmax", "bits": ["w4a4"]}}], not {kind}')
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


def _quantize(model_path: Path, keys: dict[str, str], method: str, bits: str, params: dict, calib: "LazyCalibration", out: Path, work: Path,
              device: torch.device, rules: list | None = None, calib_batches: int | None = None) -> dict:
    """Quantize once into ``out``; reused while the model file's content, the calibration set's manifest and the
    run's settings are unchanged (``spec_key.txt``). Keyed on content, not paths: a cache made on another machine
    (e.g. the GPU host of benchmarks/compare_gpu.py) is found here when the same files are used."""
    fields = [keys["model"], keys["calib"], method, bits, params, [r.to_dict() for r in rules or []]] + ([calib_batches] if calib_batches else [])
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
    batches = calib.batches(calib_batches)
    workdir = work / f".{out.name}.work"
    prepare_workdir(workdir, {"spec_key": key, "calibration_batches": len(batches)})  # never resume another spec's state
    summary = quantize_(model, cfg, MethodContext(batches, workdir=workdir, device=device))
    save_quantized(model.cpu(), cfg, out, summary)
    stamp.write_text(key)
    return summary


class LazyCalibration:
    """The calibration set's batches of 4, read only when something must be quantized (a comparison whose every
    checkpoint is cached, e.g. one made on a GPU host and rescored here, needs no calibration images)."""

    def __init__(self, root: Path, size: int):
        self.set, self.size, self._batches = CalibrationSet.open(root), size, None  # the manifest only; InputError if not a set
        self.key = sha256_file(self.set.root / "manifest.json")
        self.count = len(self.set)

    def batches(self, limit: int | None = None) -> list[torch.Tensor]:
        if self._batches is None:
            self._batches = self.set.batches(self.size, 4)
        return self._batches[:limit] if limit else self._batches

    def images(self, limit: int | None = None) -> int:
        return min(self.count, 4 * limit) if limit else self.count


def run_comparison(spec: list[dict[str, Any]], model_path: Path, calib_dir: Path, eval_dir: Path, out: Path, work: Path,
                   device: torch.device, batch_size: int = 8, name: str = "compare") -> dict[str, Any]:
    fp = load_model(model_path).to(device)
    size = fp.image_size
    ev = CalibrationSet.open(eval_dir)
    calib = LazyCalibration(calib_dir, size)
    keys = {"model": sha256_file(model_path), "calib": calib.key, "eval": sha256_file(ev.root / "manifest.json")}
    lq_batches, lq, hq = load_eval_set(ev, size, None, batch_size, getattr(fp.config, "upscale", 1))
    fp_out = to_8bit(restore_set(fp, lq_batches, device, "FP"))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    example = torch.zeros(1, 3, size, size, device=device)
    metrics, skipped = metric_plan(int(min(hq.shape[-2:])))
    rows: list[dict[str, Any]] = [
        {"label": "LQ input", "bits": "-", "vs_hq": score_vs(lq, hq, metrics)},
        {"label": "FP", "bits": "W32A32", "vs_hq": score_vs(fp_out, hq, metrics), "accounting": count(fp, example).to_dict(per_layer=False)},
    ]
    grids: dict[str, dict[str, torch.Tensor]] = {}
    for run in spec:
        for bits in run["bits"]:
            label = run["label"]
            ck = work / _slug(f"{label}-{bits}")
            t0 = time.perf_counter()
            cb = run.get("calib_batches")  # a per-run compute budget
            summary = _quantize(model_path, keys, run["method"], bits, run.get("params", {}), calib, ck, work, device, calib_batches=cb)
            bits_label = bits.upper()
            if run.get("mp"):
                from toolchain.alloc.allocate import SolveSettings, build_table, parse_pin
                from toolchain.alloc.error_table import error_table
                from toolchain.alloc.sensitivity import SweepSettings, run_sensitivity
                from toolchain.alloc.table import table_rules

                from toolchain.alloc.table import load_table

                mp = run["mp"]
                alloc_dir = work / _slug(f"{label}-{bits}-alloc")
                table_key = hashlib.sha256(json.dumps([(ck / "spec_key.txt").read_text(), mp], sort_keys=True).encode()).hexdigest()[:12]
                if (alloc_dir / "mp_table.json").is_file() and (alloc_dir / "table_key.txt").is_file() and \
                        (alloc_dir / "table_key.txt").read_text() == table_key:
                    table = load_table(alloc_dir / "mp_table.json")  # the allocation of this checkpoint and these settings
                else:
                    sens = run_sensitivity(ck, calib_dir, alloc_dir, SweepSettings(metric=mp.get("metric", "st_lpips"), epsilon=mp.get("epsilon", 0.02),
                                                                                images=mp.get("images", 4)), mp.get("workers", 1), str(device))
                    errs = error_table(ck, calib_dir, mp.get("bits", [3, 4, 5, 6]), images=mp.get("images", 4), device=str(device))
                    a = int(bits.lower().split("a")[1])
                    table = build_table(sens, errs, SolveSettings(budget_bits=float(a), pins=[parse_pin(p) for p in mp.get("pins", [])]), str(ck),
                                        alloc_dir, {"metric": next(iter(sens.values()))["metric"], "epsilon": mp.get("epsilon", 0.02)})
                    atomic_write_text(alloc_dir / "table_key.txt", table_key)
                ck = work / _slug(f"{label}-{bits}-mp")
                summary = _quantize(model_path, keys, run["method"], bits, run.get("params", {}), calib, ck, work, device, table_rules(table),
                                    calib_batches=cb)
                bits_label = f"W{bits.lower().split('a')[0][1:]}A{table['average_a_bits']:.2f}"
            cached = _cached_eval(ck, keys, len(hq))
            if cached is not None:
                cached[0]["checkpoint"] = str(ck)  # where it is now (the cache may have moved)
                row, out_imgs = cached
                if _rescore(row, out_imgs, hq, fp_out, metrics):  # metrics this machine can add (e.g. dlib's, to a GPU-made row)
                    _store_eval(ck, keys, row, None)
            else:
                if not (ck / "model.safetensors").is_file():
                    from toolchain.errors import InputError

                    raise InputError(f"the stored outputs of {ck.name} are missing or damaged and its weights are not in {ck} "
                                     f"(a cache brought home without weights?); delete {ck} to quantize it again")
                model, _ = load_quantized(ck, device)
                out_imgs = to_8bit(restore_set(model, lq_batches, device, f"{label} {bits}"))
                vs_hq = score_vs(out_imgs, hq, metrics)
                row = {"label": label, "method": run["method"], "params": run.get("params", {}), **({"mp": run["mp"]} if run.get("mp") else {}),
                       "bits": bits_label, "checkpoint": str(ck),
                       "calibration_images": calib.images(cb),
                       "vs_hq": vs_hq, "vs_fp": score_vs(out_imgs, fp_out, metrics, copy_from=vs_hq),
                       "accounting": count(model, example).to_dict(per_layer=False), "seconds": round(time.perf_counter() - t0, 1),
                       "device": where,
                       "summary": {k: v for k, v in summary.items() if k in ("quantized_layers", "balance", "lowrank", "seconds", "trq")}}
                _store_eval(ck, keys, row, out_imgs)
            rows.append(row)
            grids.setdefault(bits, {"LQ": lq, "FP": fp_out})[label] = out_imgs
            shown = (("st_lpips", "ST-LPIPS", ".4f"), ("identity_deg", "ID°", ".1f"), ("lmd", "LMD", ".2f"), ("niqe", "NIQE", ".2f"))
            extra = "".join(f"  {short} {row['vs_hq'][m]:{f}}" for m, short, f in shown if m in row["vs_hq"])
            print(f"{label:>28} {bits_label:>9}: PSNR {row['vs_hq']['psnr']:.2f}{extra}  | vs FP PSNR {row['vs_fp']['psnr']:.2f}", flush=True)
            _write(rows, out, name, model_path, calib_dir, eval_dir, metrics, skipped)
    for bits, cols in grids.items():
        cols["HQ"] = hq
        save_grid(out / f"{name}_grid_{bits}.png", cols, max_rows=4, cell=128)
    return _write(rows, out, name, model_path, calib_dir, eval_dir, metrics, skipped)


def to_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round images in [0, 1] to the 8-bit grid a saved PNG holds. Every row is scored on these, so scores made
    at restoration time and scores added later from the stored PNGs are of the same images."""
    return (images.clamp(0, 1) * 255).round() / 255


def _eval_key(ck: Path, keys: dict[str, str]) -> str:
    """Restored images of one checkpoint on one eval set: the checkpoint's spec key and the set's manifest hash."""
    spec_key = (ck / "spec_key.txt").read_text() if (ck / "spec_key.txt").is_file() else ""
    return hashlib.sha256(json.dumps([spec_key, keys["eval"]]).encode()).hexdigest()[:12]


def _cached_eval(ck: Path, keys: dict[str, str], n_images: int) -> tuple[dict[str, Any], torch.Tensor] | None:
    """A rerun reuses each checkpoint's scores and restored images (8-bit PNGs), so one command rebuilds the whole
    table cheaply, and the table can be rebuilt where the checkpoint's weights are not (only the PNGs and the row).
    A damaged entry (unreadable row, a PNG count other than the evaluation set's ``n_images``, unreadable image)
    counts as not cached: it is restored again."""
    import numpy as np
    from PIL import Image

    key = _eval_key(ck, keys)
    row_path, img_dir = ck / f"eval-{key}.json", ck / f"eval-{key}"
    if not (row_path.is_file() and img_dir.is_dir()):
        return None
    files = sorted(img_dir.glob("*.png"))
    if len(files) != n_images:
        return None
    try:
        row = json.loads(row_path.read_text())
        imgs = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    except (OSError, ValueError):  # JSONDecodeError is a ValueError; PIL raises OSError/ValueError on a bad file
        return None
    if not isinstance(row, dict) or not isinstance(row.get("vs_hq"), dict):
        return None
    return row, torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255


def _store_eval(ck: Path, keys: dict[str, str], row: dict[str, Any], images: torch.Tensor | None) -> None:
    """Write the row (and, when given, the restored images as 8-bit PNGs, atomically as one folder)."""
    from PIL import Image

    key = _eval_key(ck, keys)
    if images is not None:
        with atomic_directory(ck / f"eval-{key}") as tmp:
            arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for i, a in enumerate(arr):
                Image.fromarray(a).save(tmp / f"{i:05d}.png")
    atomic_write_json(ck / f"eval-{key}.json", row)


def _rescore(row: dict[str, Any], out_imgs: torch.Tensor, hq: torch.Tensor, fp_out: torch.Tensor, metrics: list[str]) -> bool:
    """Add to a cached row the metrics of this comparison's plan it lacks (computed from its stored images).
    Returns True when something was added."""
    changed = False
    for side, ref in (("vs_hq", hq), ("vs_fp", fp_out)):
        scores = row.setdefault(side, {})
        todo = [m for m in metrics if m not in scores and m not in scores.get("missing", {})]
        if not todo:
            continue
        new = score_vs(out_imgs, ref, todo, copy_from=row["vs_hq"] if side == "vs_fp" else None)
        missing = {**scores.get("missing", {}), **new.pop("missing", {})}
        scores.update(new)
        if missing:
            scores["missing"] = missing
        changed = True
    return changed


def _bits_rank(row: dict[str, Any]) -> tuple[float, float]:
    """LQ, FP, then W8A8 > W6A6 > W4A6 > W4A4 > W4A3.98 (MP)."""
    m = re.fullmatch(r"W(\d+)A([\d.]+)", str(row["bits"]))
    if not m:
        return (-1e9, 0.0)
    return (-float(m.group(1)), -float(m.group(2)))


# (key, header, format, lower is better) of the markdown columns, vs HQ then vs FP; NIQE (no reference) once per output.
HQ_COLUMNS = [("psnr", "PSNR", ".2f"), ("ssim", "SSIM", ".4f"), ("st_lpips", "ST-LPIPS", ".4f"), ("fd_stlpips", "FD-STLPIPS", ".4f"),
              ("identity_deg", "ID° (dlib)", ".2f"), ("lmd", "LMD (px)", ".2f"), ("niqe", "NIQE", ".2f")]
FP_COLUMNS = [("psnr", "PSNR vs FP", ".2f"), ("st_lpips", "ST-LPIPS vs FP", ".4f"), ("identity_deg", "ID° vs FP", ".2f"),
              ("lmd", "LMD vs FP", ".2f")]


def _arrow(metric: str) -> str:
    from toolchain.eval.metrics import LOWER_IS_BETTER

    return "↓" if metric in LOWER_IS_BETTER else "↑"


def _cell(scores: dict[str, Any] | None, key: str, fmt: str, skipped: dict[str, str], notes: dict[str, int]) -> str:
    """One table cell: the value; "n/a [k]" with note k giving the reason when the metric could not run;
    "–" where the comparison does not apply (no float-model reference for the LQ and FP rows)."""
    if scores is None:
        return "–"
    value = scores.get(key)
    if value is not None:
        text = format(value, fmt)
        n = len(scores.get("psnr_per_image", ()))
        if key in DETECTED_METRICS and "faces_detected" in scores and scores["faces_detected"] < n:
            text += f" ({scores['faces_detected']}/{n} faces)"
        return text
    why = scores.get("missing", {}).get(key) or skipped.get(key)
    if why is None and key == "fd_stlpips":
        why = "a set metric: needs at least 2 images"
    why = why or "not computed"
    return f"n/a [{notes.setdefault(why, len(notes) + 1)}]"


def _write(rows: list[dict[str, Any]], out: Path, name: str, model_path: Path, calib: Path, ev: Path, metrics: list[str] | None = None,
           skipped: dict[str, str] | None = None) -> dict[str, Any]:
    from toolchain.eval.metrics import LOWER_IS_BETTER, METRIC_NOTES

    metrics, skipped = list(metrics or METRICS), dict(skipped or {})
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model": str(model_path), "calibration": str(calib), "eval": str(ev), "metrics": metrics, "skipped_metrics": skipped,
           "lower_is_better": sorted(m for m in metrics + list(skipped) if m in LOWER_IS_BETTER),
           "metric_notes": {m: METRIC_NOTES[m] for m in metrics + list(skipped) if m in METRIC_NOTES}, "rows": rows}
    atomic_write_json(out / f"{name}.json", doc)
    head = ["Bits", "Method"] + [h + _arrow(k) for k, h, _ in HQ_COLUMNS] + [h + _arrow(k) for k, h, _ in FP_COLUMNS] + [
        "Params (M, paper conv.)", "Ops (G, paper conv.)", "Size (MB, honest)", "Time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: dict[str, int] = {}
    for r in sorted(rows, key=_bits_rank):  # grouped by bit setting as in the paper's Table 1; stable within a group
        acc = r.get("accounting", {})
        cells = [str(r["bits"]), r["label"]]
        cells += [_cell(r["vs_hq"], k, f, skipped, notes) for k, _, f in HQ_COLUMNS]
        cells += [_cell(r.get("vs_fp"), k, f, skipped, notes) for k, _, f in FP_COLUMNS]
        cells += ([f"{acc['paper']['params_M']:.2f}", f"{acc['paper']['ops_G']:.2f}", f"{acc['honest']['size_MB']:.2f}"] if acc else ["–"] * 3)
        cells.append(f"{r['seconds']:.0f}" if r.get("seconds") is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "↓ lower is better, ↑ higher is better. ID°: angle between dlib 128-D face embeddings (not ArcFace: not comparable "
              "with the paper's Deg.); LMD: mean distance of dlib's 68 landmarks in pixels at the images' resolution; NIQE: "
              "no-reference, of the output alone (below 192 px a single patch: not comparable with published NIQE). "
              "\"(k/N faces)\": dlib's detector found a face in only k of the N reference images; the others were measured in the whole crop."]
    budgets: dict[str, str] = {}
    for r in rows:
        if "method" in r and r["label"] not in budgets:
            params = ", ".join(f"{k}={v}" for k, v in r.get("params", {}).items()) or "method defaults"
            mp = r.get("mp")
            mp_text = f"; mixed precision: {', '.join(f'{k}={v}' for k, v in mp.items())}" if mp else ""
            budgets[r["label"]] = f"{r['method']}: {params}{mp_text}; {r.get('calibration_images', '?')} calibration images"
    devices = sorted({str(r["device"]) for r in rows if r.get("device")})
    lines += ["", "Budgets (settings as run; everything else at the method's defaults, `toolchain methods`): "
              + "; ".join(f"**{label}** {b}" for label, b in budgets.items()) + "."]
    if devices:
        lines += ["", "Time (s): quantization + restoring the evaluation set (mixed-precision rows: with the sensitivity sweep, "
                  "error table and second quantization), wall clock, on " + ", ".join(devices) + "."]
    if notes:
        lines += [""] + [f"n/a [{k}]: {why}" for why, k in notes.items()]
    atomic_write_text(out / f"{name}.md", "\n".join(lines) + "\n")
    return doc
