"""Parity of an exported graph with the PyTorch fake-quant model.

Low-bit fake quantization is discontinuous: a float difference of one ULP that moves a value
across a rounding boundary changes it by a whole quantization step, and in a deep network such
flips multiply (each one perturbs the next layer's inputs enough to flip more). Two correct
implementations with different float accumulation orders (ORT's MLAS vs PyTorch's kernels)
therefore agree exactly until the first flip and then diverge towards the quantization-noise
level. ``validate_runs`` reports, per image, the runtime vs PyTorch together with the *float-noise floor* —
PyTorch against itself with 1e-7 relative noise on every conv/linear output — so a mismatch can
be told apart from an export bug; ``toolchain.export.qdq.layer_parity`` checks every quantized layer on its real
input (teacher-forced), where an export bug cannot hide.

One routine serves both targets: each target hands ``validate_runs`` its ways of running the
exported file (ONNX: a *default* ONNX Runtime session — what a user's ``InferenceSession(path)``
does — and one with every graph optimisation off, the ONNX reference semantics; TFLite: LiteRT's
default interpreter with XNNPACK and its built-in kernels alone); every run is compared with the
fake-quant model and with full precision on the same inputs, beside the float-noise floor, and the
CPU's ISA is named, because runtimes pick integer kernels by CPU (toolchain/export/ops.py).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from toolchain.export.parts import part_module
from toolchain.cpu import cpu_isa
from toolchain.eval.metrics import psnr_from_mse

Runner = Callable[[tuple[torch.Tensor, ...]], np.ndarray]

NOTE = ("Exported graph vs the PyTorch fake-quant model. At <= 4-bit activations one float ULP (runtimes and PyTorch sum "
        "convolutions in different orders) that crosses a rounding boundary moves a value a whole step and the flips cascade, "
        "so vs_fake_quant can be low (~20 dB) for a correct export; float_noise_floor shows PyTorch against itself under 1e-7 "
        "relative noise. Whether an ONNX export is exact is checked layer by layer (toolchain.export.qdq.layer_parity); whether it is as "
        "good is vs_fp here and vs HQ in toolchain eval.")


def compare(a: np.ndarray, b: np.ndarray, image: bool) -> dict[str, float]:
    """max/mean |a − b|, and for images in [-1, 1] the PSNR in dB on the [0, 1] scale (inf when equal)."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    res = {"max_abs_error": float(diff.max()), "mean_abs_error": float(diff.mean())}
    if image:
        res["psnr_db"] = psnr_from_mse(float((diff ** 2).mean()), data_range=2.0)  # [-1, 1] images
    return res


def perturbed_reference(model: nn.Module, part: str, inputs: tuple[torch.Tensor, ...], rel: float = 1e-7, seed: int = 0) -> np.ndarray:
    """PyTorch output with ``rel`` relative noise on every conv/linear output (a float-reordering stand-in)."""
    gen = torch.Generator().manual_seed(seed)
    hooks = [m.register_forward_hook(lambda mod, i, o: o * (1 + rel * torch.randn(o.shape, generator=gen)))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        wrapped, _, _, _ = part_module(model, part)
        with torch.no_grad():
            return wrapped(*inputs).numpy()
    finally:
        for h in hooks:
            h.remove()


def _stats(values: list[float], image: bool) -> dict[str, float]:
    """PSNR (dB, capped at 150 for identical outputs): worst = min; max abs error: worst = max."""
    if image:
        v = [min(x, 150.0) for x in values]
        return {"min": min(v), "median": float(np.median(v))}
    return {"max": max(values), "median": float(np.median(values))}


def validate_runs(runs: dict[str, Runner], model: nn.Module, part: str, batches: list[tuple[torch.Tensor, ...]], target: str,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each way of running an exported file vs the PyTorch model it came from, on every input tuple.

    Args: runs: name → function(input tuple) → first output as a numpy array (the first run is the one a
    user gets by default); model: the fake-quant (or float) PyTorch model; part: as in toolchain/export/parts.py;
    batches: input tuples of float32 tensors in the part's layout (images in [-1, 1]); target: ``onnx`` |
    ``tflite``. Returns ``metric`` (``psnr_db`` in dB on the [0, 1] scale for image outputs — ``full``,
    ``vae_decoder`` — else ``max_abs_error``), per run ``runs[name].vs_fake_quant`` / ``vs_fp`` (worst and
    median over the images), ``fake_quant_vs_fp`` (what quantization itself costs), ``float_noise_floor``,
    the default run's medians at the top level (``median_vs_fake_quant``, ``median_vs_fp``,
    ``median_fake_quant_vs_fp``), for images ``psnr_db_min`` / ``psnr_db_median`` (default run vs fake
    quant), ``max_abs_error``, ``per_image`` rows and ``cpu`` (cpu_isa()). Raises ValueError with no inputs."""
    from toolchain.quant.calibrate import quantizers_off

    if not batches:
        raise ValueError("validation needs at least one input")
    image = part in ("full", "vae_decoder")
    key = "psnr_db" if image else "max_abs_error"
    rows = []
    for inputs in batches:
        wrapped, _, _, _ = part_module(model, part)
        with torch.no_grad():
            fq = wrapped(*inputs).numpy()
            with quantizers_off(model):
                fp = wrapped(*inputs).numpy()
        row: dict[str, Any] = {"fake_quant_vs_fp": compare(fq, fp, image), "float_noise_floor": compare(perturbed_reference(model, part, inputs), fq, image)}
        for name, run in runs.items():
            out = run(inputs)
            row[name] = {"vs_fake_quant": compare(out, fq, image), "vs_fp": compare(out, fp, image)}
        rows.append(row)
    default = next(iter(runs))
    per_run = {name: {ref: _stats([r[name][ref][key] for r in rows], image) for ref in ("vs_fake_quant", "vs_fp")} for name in runs}
    summary: dict[str, Any] = {
        "target": target, "images": len(rows), "metric": key, "default_run": default, "runs": per_run,
        "fake_quant_vs_fp": _stats([r["fake_quant_vs_fp"][key] for r in rows], image),
        "float_noise_floor": _stats([r["float_noise_floor"][key] for r in rows], image),
        "median_vs_fake_quant": per_run[default]["vs_fake_quant"]["median"], "median_vs_fp": per_run[default]["vs_fp"]["median"],
        "max_abs_error": max(r[default]["vs_fake_quant"]["max_abs_error"] for r in rows),
        "cpu": cpu_isa(), "note": NOTE, "per_image": rows, **(extra or {}),
    }
    summary["median_fake_quant_vs_fp"] = summary["fake_quant_vs_fp"]["median"]
    if image:
        summary["psnr_db_min"] = per_run[default]["vs_fake_quant"]["min"]
        summary["psnr_db_median"] = per_run[default]["vs_fake_quant"]["median"]
    return summary
