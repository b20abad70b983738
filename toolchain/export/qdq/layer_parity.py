"""ONNX, layer by layer: every exported quantized layer run in ONNX Runtime on the input PyTorch gave
it (teacher-forced), where an export bug cannot hide behind the rounding-flip cascade of a whole
low-bit graph (see toolchain/export/validate.py)."""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

from toolchain.export.parts import part_module
from toolchain.export.prepare import ExportQuantLayer, export_module
from toolchain.export.qdq.runtime import ort_session

SESSIONS = {"default": True, "no_optimizations": False}  # name → ORT graph optimisations on


def layer_models(model: nn.Module, inputs: tuple[torch.Tensor, ...], part: str = "full", opset: int = 21
                 ) -> dict[str, tuple[bytes, np.ndarray, np.ndarray]]:
    """Every exported quantized layer as its own ONNX model, with the input PyTorch gave it in a
    forward of ``part`` on ``inputs`` and the output PyTorch computed: layer → (model bytes, x, y)."""
    from toolchain.export.qdq.graph import finalize, trace

    desc = export_module(model)
    module = desc.module
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
        proto = trace(module.get_submodule(name), (x,), io.BytesIO(), opset, ["x"], ["y"])
        finalize(proto, {"": desc.layers[name]})  # the same INT4 / UINT16 / function steps as the whole-model export
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
