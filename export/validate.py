"""Parity of an exported graph with the PyTorch fake-quant model.

Low-bit fake quantization is discontinuous: a float difference of one ULP that moves a value
across a rounding boundary changes it by a whole quantization step, and in a deep network such
flips multiply (each one perturbs the next layer's inputs enough to flip more). Two correct
implementations with different float accumulation orders (ORT's MLAS vs PyTorch's kernels)
therefore agree exactly until the first flip and then diverge towards the quantization-noise
level. ``validate`` reports, per image, ORT vs PyTorch together with the *float-noise floor* —
PyTorch against itself with 1e-7 relative noise on every conv/linear output — so a mismatch can
be told apart from an export bug; ``layer_parity`` checks every quantized layer on its real
input (teacher-forced), where an export bug cannot hide.

Both run the graph twice: in a *default* ONNX Runtime session (what a user's
``InferenceSession(path)`` does, every graph optimisation and fused integer kernel on) and with
every optimisation off (the ONNX reference semantics), and name the CPU's ISA, because ORT picks
its integer kernels by CPU (export/ops.py).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from torch import nn

from export.onnx_backend import compare, ort_session
from export.parts import part_module
from export.prepare import ExportQuantLayer, export_module
from toolchain.profile.cpu import cpu_isa

SESSIONS = {"default": True, "no_optimizations": False}  # name → ORT graph optimisations on


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


def _image_summary(rows: list[dict[str, Any]], image: bool) -> dict[str, Any]:
    summary: dict[str, Any] = {"images": len(rows), "per_image": rows, "max_abs_error": max(r["max_abs_error"] for r in rows)}
    if image:
        finite = [min(r["psnr_db"], 150.0) for r in rows]
        summary.update({"psnr_db_min": min(finite), "psnr_db_median": float(np.median(finite))})
    return summary


def validate(onnx_path: str, model: nn.Module, part: str, batches: list[tuple[torch.Tensor, ...]], threads: int | None = None) -> dict[str, Any]:
    """ORT vs PyTorch (fake-quant or float) on each input tuple, in a default session and with all
    graph optimisations off.

    Args: onnx_path: an exported ``.onnx``; model: the PyTorch model it came from; part: as in
    export/parts.py; batches: input tuples of float32 tensors in the part's layout (images in
    [-1, 1]). Returns the default session's figures at the top level (``max_abs_error``, and for
    image outputs ``psnr_db_min`` / ``psnr_db_median`` in dB on the [0, 1] scale), the same under
    ``sessions.no_optimizations``, the float-noise floor per image, ``cpu`` (cpu_isa()) and
    ``ort_threads``. ORT's float conv sums depend on its thread count, so at ≤ 4-bit activations the
    end-to-end figure can differ between thread counts by a cascade of rounding flips (the per-layer
    check cannot); pass ``threads`` to make a figure reproducible.
    """
    sessions = {name: ort_session(onnx_path, threads, optimize=opt) for name, opt in SESSIONS.items()}
    names = [i.name for i in sessions["default"].get_inputs()]
    image = part in ("full", "vae_decoder")
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in sessions}
    floors = []
    for inputs in batches:
        wrapped, _, _, _ = part_module(model, part)
        with torch.no_grad():
            ref = wrapped(*inputs).numpy()
        feeds = {n: t.numpy() for n, t in zip(names, inputs)}
        for name, sess in sessions.items():
            rows[name].append(compare(sess.run(None, feeds)[0], ref, image))
        floors.append(compare(perturbed_reference(model, part, inputs), ref, image))
    for row, floor in zip(rows["default"], floors):
        row["float_noise_floor"] = floor
    summary = _image_summary(rows["default"], image)
    if image:
        floor = float(np.median([min(f["psnr_db"], 150.0) for f in floors]))
        summary["float_noise_floor_psnr_db_median"] = floor
        # a low PSNR at low bits is usually rounding flips, not an export bug: say so where the figure is read
        summary["note"] = ("ORT vs the PyTorch fake-quant model. At <= 4-bit activations one float ULP (ORT and PyTorch sum "
                           "convolutions in different orders) that crosses a rounding boundary moves a value a whole step and the "
                           "flips cascade, so this figure can be low (~20 dB) for a correct export; float_noise_floor shows PyTorch "
                           "against itself under 1e-7 relative noise. Whether the export is exact is checked layer by layer "
                           "(export.validate.layer_parity); whether it is as good is checked against HQ (toolchain eval).")
    summary["sessions"] = {name: {k: v for k, v in _image_summary(r, image).items() if k != "per_image"} for name, r in rows.items()}
    summary["cpu"] = cpu_isa()
    summary["ort_threads"] = threads or sessions["default"].get_session_options().intra_op_num_threads or "ORT default (physical cores)"
    return summary


def layer_models(model: nn.Module, inputs: tuple[torch.Tensor, ...], part: str = "full", opset: int = 21
                 ) -> dict[str, tuple[bytes, np.ndarray, np.ndarray]]:
    """Every exported quantized layer as its own ONNX model, with the input PyTorch gave it in a
    forward of ``part`` on ``inputs`` and the output PyTorch computed: layer → (model bytes, x, y)."""
    import onnx

    from export.onnx_backend import finalize

    module, info = export_module(model)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=n: captured.__setitem__(name, (i[0].detach(), o.detach())))
             for n, m in module.named_modules() if isinstance(m, ExportQuantLayer)]
    wrapped, _, _, _ = part_module(module, part)
    with torch.no_grad():
        wrapped(*inputs)
    for h in hooks:
        h.remove()
    out: dict[str, tuple[bytes, np.ndarray, np.ndarray]] = {}
    for name, (x, y) in captured.items():
        buf = io.BytesIO()
        torch.onnx.export(module.get_submodule(name), (x,), buf, dynamo=False, opset_version=opset, input_names=["x"], output_names=["y"])
        proto = onnx.load_from_string(buf.getvalue())
        finalize(proto, {"": info[name]})  # the same INT4 / UINT16 / function steps as the whole-model export
        out[name] = (proto.SerializeToString(), x.numpy(), y.numpy())
    return out


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """max |out − ref| / max |ref| (0 when both are zero)."""
    return float(np.abs(out - ref).max() / max(1e-12, float(np.abs(ref).max())))


def layer_parity(model: nn.Module, inputs: tuple[torch.Tensor, ...], part: str = "full", opset: int = 21,
                 sessions: tuple[str, ...] = ("default", "no_optimizations")) -> dict[str, float]:
    """Teacher-forced: every exported quantized layer run in ORT on the input PyTorch gave it;
    returns layer → the worst over ``sessions`` of max |ORT − PyTorch| / max |PyTorch|."""
    errors: dict[str, float] = {}
    for name, (proto, x, y) in layer_models(model, inputs, part, opset).items():
        errors[name] = max(relative_error(ort_session(proto, optimize=SESSIONS[s]).run(None, {"x": x})[0], y) for s in sessions)
    return errors
