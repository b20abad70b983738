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


def validate(onnx_path: str, model: nn.Module, part: str, batches: list[tuple[torch.Tensor, ...]], threads: int | None = None) -> dict[str, Any]:
    """ORT vs PyTorch on each input tuple; image outputs get PSNR on the [0, 1] scale."""
    sess = ort_session(onnx_path, threads)
    names = [i.name for i in sess.get_inputs()]
    image = part in ("full", "vae_decoder")
    rows = []
    for inputs in batches:
        wrapped, _, _, _ = part_module(model, part)
        with torch.no_grad():
            ref = wrapped(*inputs).numpy()
        out = sess.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]
        row = compare(out, ref, image)
        row["float_noise_floor"] = compare(perturbed_reference(model, part, inputs), ref, image)
        rows.append(row)
    summary = {"images": len(rows), "per_image": rows, "max_abs_error": max(r["max_abs_error"] for r in rows)}
    if image:
        finite = [min(r["psnr_db"], 150.0) for r in rows]
        floor = [min(r["float_noise_floor"]["psnr_db"], 150.0) for r in rows]
        summary.update({"psnr_db_min": min(finite), "psnr_db_median": float(np.median(finite)), "float_noise_floor_psnr_db_median": float(np.median(floor))})
    return summary


def layer_parity(model: nn.Module, inputs: tuple[torch.Tensor, ...], part: str = "full", opset: int = 21) -> dict[str, float]:
    """Teacher-forced: every exported quantized layer run in ORT on the input PyTorch gave it; returns
    layer → max |ORT − PyTorch| relative to the output's max magnitude."""
    import onnx

    from export.hadamard_onnx import DOMAIN, function_protos

    module, _ = export_module(model)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=n: captured.__setitem__(name, (i[0].detach(), o.detach())))
             for n, m in module.named_modules() if isinstance(m, ExportQuantLayer)]
    wrapped, _, _, _ = part_module(module, part)
    with torch.no_grad():
        wrapped(*inputs)
    for h in hooks:
        h.remove()
    errors: dict[str, float] = {}
    for name, (x, y) in captured.items():
        layer = module.get_submodule(name)
        buf = io.BytesIO()
        torch.onnx.export(layer, (x,), buf, dynamo=False, opset_version=opset, input_names=["x"], output_names=["y"])
        proto = onnx.load_from_string(buf.getvalue())
        used = {n.op_type for n in proto.graph.node if n.domain == DOMAIN}
        if used:
            proto.functions.extend(function_protos(used))
            proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
        import onnxruntime as ort

        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        out = sess.run(None, {"x": x.numpy()})[0]
        errors[name] = float(np.abs(out - y.numpy()).max() / max(1e-12, float(y.abs().max())))
    return errors
