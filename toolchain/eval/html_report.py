"""``report.html`` + ``report.json`` of a ``toolchain run`` folder: one static page, no server.

Reads the stage artifacts the run wrote (``eval/report.json`` and ``grid.png``, ``quantize/*/``,
``export/*`` with their ``.json``/``.precision.json`` sidecars, ``profile/*/profile.json``) and renders
them with a Jinja2 template (``toolchain/templates/run_report.html.j2``): the before/after grid, the
metrics table, per-layer designed vs executed bits with the per-layer latency, file sizes, and the
exact recipe. Images are referenced by relative path, so the folder can be moved or zipped whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolchain.io.atomic import atomic_write_json, atomic_write_text

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "templates"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (ValueError, OSError):
        return None


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else (f"{v:.2f}" if isinstance(v, float) else ("–" if v is None else str(v)))


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def collect(out: Path, recipe: dict[str, Any], stages: list[str], eval_dir: Path | None, checkpoints: dict[str, Path],
            exports: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the page shows, as plain JSON (this is ``report.json``). The artifacts are where the run put them:
    ``eval_dir`` (report.json, grid.png), ``checkpoints`` (run name → folder), ``exports`` ({name, target, source,
    path, profile: the profile folder or None}); paths in the result are relative to ``out``."""
    from toolchain import __version__

    ev = _read(eval_dir / "report.json") if eval_dir is not None else None
    doc: dict[str, Any] = {"name": recipe.get("name", "recipe"), "toolchain": __version__, "stages": stages, "recipe": recipe,
                           "evaluation": None, "exports": [], "files": []}
    if ev:
        doc["evaluation"] = {"metrics": ev["metrics"], "skipped_metrics": ev.get("skipped_metrics", {}), "data": ev.get("data"),
                             "results": {k: {"vs_hq": {m: r.get("vs_hq", {}).get(m) for m in ev["metrics"]},
                                             "vs_fp": {m: r.get("vs_fp", {}).get(m) for m in ev["metrics"]} if "vs_fp" in r else None,
                                             "checkpoint": r.get("checkpoint")}
                                         for k, r in ev["results"].items()}}
    float_size = None
    for e in exports:
        path = e["path"]
        if not path.is_file():
            continue
        side = _read(Path(str(path) + ".json")) or {}
        precision = _read(path.with_suffix(".precision.json")) or {}
        prof = _read(e["profile"] / "profile.json") if e["profile"] is not None else None
        chart = e["profile"] / "per_layer_latency.png" if e["profile"] is not None else None
        per_layer = (prof or {}).get("per_layer_ms") or {}
        layers = []
        for name, r in (precision.get("layers") or {}).items():
            if not r:
                continue
            designed = f"W{r.get('designed_w_bits') or '–'}A{r.get('designed_a_bits') or '–'}"
            executed = f"{r.get('executed_weight') or '–'} / {r.get('executed_activation') or '–'}"
            a_bits, exec_a = r.get("designed_a_bits"), str(r.get("executed_activation") or "")
            layers.append({"name": name, "designed": designed, "executed": executed, "ms": per_layer.get(name),
                           "mismatch": bool(a_bits) and exec_a not in ("", f"int{a_bits}", f"uint{a_bits}")})
        inf = (prof or {}).get("inference_ms") or {}
        entry = {"name": e["name"], "target": e["target"], "source": e["source"], "file": str(path.relative_to(out)),
                 "bytes": path.stat().st_size, "validation": side.get("validation"), "layers": layers,
                 "latency_ms": {k: inf.get(k) for k in ("median", "min", "avg") if k in inf} or None,
                 "threads": (prof or {}).get("threads"),
                 "chart": str(chart.relative_to(out)) if chart is not None and chart.is_file() else None}
        doc["exports"].append(entry)
        if e["source"] == "fp":
            float_size = float_size or path.stat().st_size
    for p in checkpoints.values():
        if p.exists():
            doc["files"].append({"path": str(p.relative_to(out)), "bytes": _size(p)})
    for e in doc["exports"]:
        doc["files"].append({"path": e["file"], "bytes": e["bytes"], "vs_float_export": e["bytes"] / float_size if float_size else None})
    return doc


def _validation_text(v: Any) -> str | None:
    if not isinstance(v, dict):
        return None
    parts = []
    for key, label in (("median_vs_fake_quant", "vs PyTorch fake quant"), ("median_vs_fp", "vs float")):
        if v.get(key) is not None:
            parts.append(f"median {v.get('metric', 'PSNR')} {label} {v[key]:.2f}")
    return ", ".join(parts) or None


def write_run_report(out: Path, recipe: dict[str, Any], stages: list[str], eval_dir: Path | None = None,
                     checkpoints: dict[str, Path] | None = None, exports: list[dict[str, Any]] | None = None) -> Path:
    """Write ``out/report.json`` and ``out/report.html`` (arguments as for ``collect``); returns the HTML path."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    doc = collect(out, recipe, stages, eval_dir, checkpoints or {}, exports or [])
    atomic_write_json(out / "report.json", doc)
    ev = doc["evaluation"]
    metric_names = ev["metrics"] if ev else []
    rows = []
    if ev:
        for label, r in ev["results"].items():
            rows.append({"label": label, "bits": label.split(" ", 1)[1] if " " in label and label not in ("LQ input",) else "",
                         "vs_hq": [_fmt(r["vs_hq"].get(m)) for m in metric_names],
                         "vs_fp": [_fmt((r["vs_fp"] or {}).get(m)) if r["vs_fp"] else "–" for m in metric_names]})
    exports = []
    for e in doc["exports"]:
        lat = e["latency_ms"]
        exports.append({**e, "validation": _validation_text(e["validation"]),
                        "latency": f"median {lat['median']:.2f} ms" if lat and lat.get("median") is not None else None,
                        "layers": [{**l, "ms": _fmt(l["ms"]) if l["ms"] is not None else "–"} for l in e["layers"]]})
    files = [{"path": f["path"], "mib": f["bytes"] / 2**20,
              "ratio": f"{f['vs_float_export']:.3f}" if f.get("vs_float_export") else "–"} for f in doc["files"]]
    env = Environment(loader=FileSystemLoader(str(TEMPLATE_DIR)), autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("run_report.html.j2").render(
        name=doc["name"], version=doc["toolchain"], stages=stages,
        grid=str((eval_dir / "grid.png").relative_to(out)) if eval_dir is not None and (eval_dir / "grid.png").is_file() else None,
        metrics_rows=rows, metric_names=metric_names, skipped=(ev or {}).get("skipped_metrics", {}), files=files, exports=exports,
        recipe_json=json.dumps(recipe, indent=2))
    return atomic_write_text(out / "report.html", html)
