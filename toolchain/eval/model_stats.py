"""What makes a model hard or easy to quantize: per-layer weight and input-activation statistics.

For every quantizable layer (Conv2d/Linear, ``toolchain.quant.config.quantizable_layers``):

* ``weight_kurtosis`` – Pearson kurtosis of all the layer's weights pooled into one sample
  (per tensor): E[(w − μ)⁴] / σ⁴ with population (biased) moments, ``scipy.stats.kurtosis(...,
  fisher=False, bias=True)``. A Gaussian gives 3, a Laplace 6, a uniform 1.8; heavy tails (a few
  large weights) give more, and stretch a per-tensor min-max grid.
* per input channel c (axis 1 of a conv's input, the last axis of a linear's) over all calibration
  images: min_c, max_c, the range r_c = max_c − min_c and the magnitude a_c = max(|min_c|, |max_c|).
  ``channel_range_ratio`` = max_c r_c / median_c r_c (≥ 1; 1 when every channel spans the same range).
* ``outlier_channels`` – channels with a_c > 10 × median_c a_c (the input has "outlier channels" when
  there is at least one; the factor is ``OUTLIER_FACTOR``).

A median of 0 (half the channels never move) makes a ratio undefined: it is reported as None with
the reason. Summary: median kurtosis, median range ratio, fraction of layers whose input has outlier
channels, and the layers at the top of each list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

OUTLIER_FACTOR = 10.0


def weight_kurtosis(weight: torch.Tensor) -> float:
    """Pearson kurtosis (normal = 3, not excess) of every element of ``weight`` pooled, in float64.

    ``weight``: any shape with at least 2 elements. Returns a float ≥ 1 (NaN for a constant tensor)."""
    from scipy.stats import kurtosis

    w = weight.detach().to(torch.float64).cpu().reshape(-1).numpy()
    if w.size < 2 or not np.isfinite(w).all():
        return float("nan")
    return float(kurtosis(w, fisher=False, bias=True))


def channel_summary(cmin: np.ndarray, cmax: np.ndarray, factor: float = OUTLIER_FACTOR) -> dict[str, Any]:
    """Statistics of one layer's input from its per-channel minima and maxima (each shape (C,)).

    Returns ``channels`` (C), ``channel_range_ratio`` (max/median of max−min; None when the median is 0),
    ``max_to_median_absmax`` (max/median of max(|min|, |max|); None when that median is 0),
    ``outlier_channels`` (indices with absmax > ``factor`` × median absmax, sorted by magnitude, at most 16),
    ``outlier_count`` and ``has_outlier_channels``."""
    cmin, cmax = np.asarray(cmin, dtype=np.float64), np.asarray(cmax, dtype=np.float64)
    rng = cmax - cmin
    absmax = np.maximum(np.abs(cmin), np.abs(cmax))
    med_r, med_a = float(np.median(rng)), float(np.median(absmax))
    out = {"channels": int(rng.size),
           "channel_range_ratio": float(rng.max() / med_r) if med_r > 0 else None,
           "max_to_median_absmax": float(absmax.max() / med_a) if med_a > 0 else None}
    if med_a > 0:
        idx = np.flatnonzero(absmax > factor * med_a)
    else:  # more than half the channels are exactly 0: any moving channel is an outlier
        idx = np.flatnonzero(absmax > 0) if rng.size > 1 else np.array([], dtype=int)
    idx = idx[np.argsort(-absmax[idx])]
    out.update({"outlier_channels": [int(i) for i in idx[:16]], "outlier_count": int(idx.size), "has_outlier_channels": bool(idx.size)})
    if med_r <= 0 or med_a <= 0:
        out["note"] = "the median channel never moves on the calibration images: ratios undefined"
    return out


def collect_channel_minmax(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[torch.Tensor],
                           forward: Callable[[torch.Tensor], Any] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Running per-input-channel (min, max) of each layer's first input over all ``batches`` (one forward
    each, no gradients). Channel axis: 1 for Conv2d, last for Linear. Layers never called are absent."""
    from toolchain.balance.stats import channel_axis

    stats: dict[str, list[torch.Tensor]] = {}
    handles = []

    def make_hook(name: str, axis: int):
        def hook(mod, args):
            x = args[0].detach().float().movedim(axis, -1)
            x = x.reshape(-1, x.shape[-1])
            lo, hi = x.amin(0), x.amax(0)
            if name in stats:
                stats[name][0] = torch.minimum(stats[name][0], lo)
                stats[name][1] = torch.maximum(stats[name][1], hi)
            else:
                stats[name] = [lo, hi]

        return hook

    for name, module in layers.items():
        handles.append(module.register_forward_pre_hook(make_hook(name, channel_axis(module))))
    forward = forward or model
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for b in batches:
                forward(b.to(device))
    finally:
        for h in handles:
            h.remove()
    return {k: (v[0].cpu().double().numpy(), v[1].cpu().double().numpy()) for k, v in stats.items()}


def layer_statistics(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[torch.Tensor],
                     forward: Callable[[torch.Tensor], Any] | None = None) -> list[dict[str, Any]]:
    """One record per layer of ``layers`` (name → Conv2d/Linear), in their order: ``name``, ``kind``,
    ``weight_shape``, ``weight_kurtosis`` (Pearson) and ``channel_summary`` of its input on ``batches``
    (``input`` None with a ``note`` when the layer never ran)."""
    minmax = collect_channel_minmax(model, layers, batches, forward)
    records = []
    for name, module in layers.items():
        rec = {"name": name, "kind": type(module).__name__, "weight_shape": list(module.weight.shape),
               "weight_kurtosis": weight_kurtosis(module.weight)}
        if name in minmax:
            rec["input"] = channel_summary(*minmax[name])
        else:
            rec["input"] = None
            rec["note"] = "not called on the calibration images"
        records.append(rec)
    return records


def summarize(records: list[dict[str, Any]], top: int = 10) -> dict[str, Any]:
    """Medians and fractions over the layers of ``layer_statistics``; NaN/None values are left out."""
    kurt = [r["weight_kurtosis"] for r in records if np.isfinite(r["weight_kurtosis"])]
    seen = [r for r in records if r["input"] is not None]
    ratios = [r["input"]["channel_range_ratio"] for r in seen if r["input"]["channel_range_ratio"] is not None]
    outl = [r for r in seen if r["input"]["has_outlier_channels"]]
    by_k = sorted((r for r in records if np.isfinite(r["weight_kurtosis"])), key=lambda r: -r["weight_kurtosis"])
    by_r = sorted((r for r in seen if r["input"]["channel_range_ratio"] is not None), key=lambda r: -r["input"]["channel_range_ratio"])
    return {
        "layers": len(records),
        "layers_with_input_stats": len(seen),
        "kurtosis_convention": "Pearson (normal = 3), per tensor, population moments",
        "median_weight_kurtosis": float(np.median(kurt)) if kurt else None,
        "fraction_weight_kurtosis_above_10": float(np.mean(np.array(kurt) > 10)) if kurt else None,
        "median_channel_range_ratio": float(np.median(ratios)) if ratios else None,
        "outlier_factor": OUTLIER_FACTOR,
        "fraction_layers_with_outlier_channel_inputs": len(outl) / len(seen) if seen else None,
        "top_kurtosis": [{"name": r["name"], "weight_kurtosis": r["weight_kurtosis"]} for r in by_k[:top]],
        "top_range_ratio": [{"name": r["name"], "channel_range_ratio": r["input"]["channel_range_ratio"],
                             "outlier_count": r["input"]["outlier_count"]} for r in by_r[:top]],
    }


def model_layer_statistics(model: nn.Module, batches: list[torch.Tensor]) -> list[dict[str, Any]]:
    """``layer_statistics`` over the model's quantizable layers (what ``toolchain quantize`` would quantize),
    with each record's ``part`` (unet, vae, embedder, …: the first component of its name).

    ``batches``: model inputs (N, 3, H, W) in [-1, 1], as ``CalibrationSet.batches`` gives them."""
    from toolchain.quant.config import quantizable_layers

    layers = dict(quantizable_layers(model))
    records = layer_statistics(model, layers, batches)
    for r in records:
        r["part"] = r["name"].split(".", 1)[0]
    return records


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None and numpy scalars made Python numbers (strict JSON)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def markdown(doc: dict[str, Any]) -> str:
    """The report as markdown: summary, then one table row per layer."""
    s = doc["summary"]
    f = lambda v, fmt=".2f": "–" if v is None else format(v, fmt)  # noqa: E731
    lines = [f"# Model statistics: {doc['model']}", "",
             f"Calibration: {doc['calibration']} ({doc['images']} images at {doc['image_size']} px). Command: `{doc['command']}`", "",
             f"- quantizable layers: {s['layers']} (with input statistics: {s['layers_with_input_stats']})",
             f"- weight kurtosis ({s['kurtosis_convention']}): median **{f(s['median_weight_kurtosis'])}**; "
             f"layers above 10: {f(s['fraction_weight_kurtosis_above_10'], '.1%')}",
             f"- input channel range ratio (max / median of per-channel max − min): median **{f(s['median_channel_range_ratio'])}**",
             f"- layers whose input has outlier channels (channel |max| > {s['outlier_factor']:g}× the median channel's): "
             f"**{f(s['fraction_layers_with_outlier_channel_inputs'], '.1%')}**", ""]
    for part, ps in doc.get("by_part", {}).items():
        lines.append(f"- {part}: {ps['layers']} layers, median kurtosis {f(ps['median_weight_kurtosis'])}, median range ratio "
                     f"{f(ps['median_channel_range_ratio'])}, outlier-channel inputs {f(ps['fraction_layers_with_outlier_channel_inputs'], '.1%')}")
    lines += ["", "| layer | kind | weight shape | kurtosis (Pearson) | channels | range ratio | max/median |max| | outlier channels |",
              "|---|---|---|---|---|---|---|---|"]
    for r in doc["layers"]:
        inp = r["input"]
        if inp is None:
            tail = f"– | – | – | – ({r.get('note', '')}) |"
        else:
            oc = f"{inp['outlier_count']}" + (f" (e.g. {', '.join(map(str, inp['outlier_channels'][:4]))})" if inp["outlier_count"] else "")
            tail = f"{inp['channels']} | {f(inp['channel_range_ratio'])} | {f(inp['max_to_median_absmax'])} | {oc} |"
        lines.append(f"| {r['name']} | {r['kind']} | {'×'.join(map(str, r['weight_shape']))} | {f(r['weight_kurtosis'])} | " + tail)
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> Path:
    """Three panels (PNG): histogram of log10 weight kurtosis (Gaussian = 3 and uniform = 1.8 marked), histogram
    of log10 input channel range ratio (10× marked), and kurtosis vs range ratio per layer, outlier-channel inputs
    in red (red drawn last, so it is never hidden)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = doc["layers"]
    k = np.array([r["weight_kurtosis"] for r in recs], dtype=float)
    rr = np.array([np.nan if r["input"] is None or r["input"]["channel_range_ratio"] is None else r["input"]["channel_range_ratio"]
                   for r in recs], dtype=float)
    oc = np.array([bool(r["input"] and r["input"]["has_outlier_channels"]) for r in recs])
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    kk = k[np.isfinite(k)]
    ax[0].hist(np.log10(kk), bins=30, color="tab:blue")
    ax[0].axvline(np.log10(3), color="k", ls="--", label="Gaussian (3)")
    ax[0].axvline(np.log10(1.8), color="grey", ls=":", label="uniform (1.8)")
    ax[0].set(xlabel="log10 weight kurtosis (Pearson, per tensor)", ylabel="layers", title=f"median {np.median(kk):.2f}")
    ax[0].legend()
    r_ok = rr[np.isfinite(rr)]
    ax[1].hist(np.log10(r_ok), bins=30, color="tab:orange")
    ax[1].axvline(1.0, color="k", ls="--", label="10×")
    ax[1].set(xlabel="log10 input channel range ratio (max / median)", ylabel="layers", title=f"median {np.median(r_ok):.2f}")
    ax[1].legend()
    m = np.isfinite(k) & np.isfinite(rr)
    ax[2].scatter(k[m & ~oc], rr[m & ~oc], s=12, label="no outlier channels")
    ax[2].scatter(k[m & oc], rr[m & oc], s=12, color="tab:red", label=f"outlier channels (> {OUTLIER_FACTOR:g}× median |max|)")
    ax[2].set(yscale="log", xlabel="weight kurtosis (Pearson)", ylabel="input channel range ratio (log)")
    if k[m].max() > 30:
        ax[2].set_xscale("log")
    ax[2].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{doc['model_name']}: {len(recs)} quantizable layers, {doc['images']} calibration images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
