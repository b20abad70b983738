"""Profile report (JSON, keyed like AI Hub's perf.yaml) and a per-layer latency chart beside designed bits."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from toolchain.io.atomic import atomic_write_bytes, atomic_write_json


def designed_bits(path: Path | None) -> dict[str, int]:
    """Layer → designed activation bits from an mp_table.json or a TFLite precision sidecar."""
    if path is None or not Path(path).is_file():
        return {}
    doc = json.loads(Path(path).read_text())
    if "layers" in doc and isinstance(doc["layers"], list):
        return {l["name"]: l["a_bits"] for l in doc["layers"]}
    if "layers" in doc and isinstance(doc["layers"], dict):
        return {n: r.get("designed_a_bits") or r.get("act", {}).get("bits") for n, r in doc["layers"].items() if r}
    return {}


def write_report(report: dict[str, Any], out_dir: Path, bits: dict[str, int]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    inf = report.get("inference_ms", {})
    report["perf"] = {"performance_metrics": {report.get("device", report.get("host", {}).get("cpu", "host")): {
        report.get("runtime", "?"): {"inference_time_milliseconds": inf.get("median", inf.get("avg")), "init_milliseconds": report.get("init_ms"),
                                     "threads": report.get("threads"), "delegate": report.get("delegate")}}}}
    atomic_write_json(out_dir / "profile.json", report)
    layers = report.get("per_layer_ms") or {}
    if not layers and report.get("ops"):
        layers = {str(o.get("name")): o.get("avg_ms") or 0.0 for o in report["ops"]}
    if layers:
        _chart(layers, bits, out_dir / "per_layer_latency.png", report.get("runtime", ""))
    return out_dir / "profile.json"


def _chart(layers: dict[str, float], bits: dict[str, int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if bits:  # chart the quantized layers (the ones with a designed bit-width), in graph order
        names = [n for n in layers if n in bits]
    else:
        top = sorted(layers, key=lambda n: -layers[n])[:80]
        names = [n for n in layers if n in top]
    fig, ax = plt.subplots(figsize=(max(8, 0.07 * len(names)), 4))
    ax.bar(range(len(names)), [layers[n] for n in names], width=1.0, color="tab:blue", label="latency (ms)")
    ax.set_ylabel("ms per run")
    ax.set_xlabel("layer, in graph order")
    ax.set_title(f"per-layer latency ({title})")
    if bits:
        ax2 = ax.twinx()
        ax2.plot(range(len(names)), [bits.get(n, float("nan")) for n in names], "o", ms=2.5, color="tab:red", label="designed activation bits")
        ax2.set_ylabel("designed activation bits", color="tab:red")
        ax2.set_ylim(0, 17)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
