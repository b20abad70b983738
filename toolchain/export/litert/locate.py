"""Find each quantized layer's CONV_2D / FULLY_CONNECTED op in a converted flatbuffer by its weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from toolchain.errors import ExportError


def op_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}


def tensor_name(t) -> str:
    return t.name.decode() if isinstance(t.name, bytes) else t.name


def tflite_layout(w: torch.Tensor) -> np.ndarray:
    return (w.permute(0, 2, 3, 1) if w.dim() == 4 else w).contiguous().numpy()  # TFLite conv weights are OHWI


def _normalised(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64).ravel()
    return v / max(float(np.abs(v).max()), 1e-30)


def match_layers(float_bytes: bytes, module: torch.nn.Module, layer_names: list[str] | list[list[str]],
                 constant: set[str] | list[set[str]] = frozenset()) -> dict[str, dict[str, Any]]:
    """Quantized layer → its CONV_2D / FULLY_CONNECTED op (input/output/weight tensor names), found by
    weight values up to a positive global factor (the converter folds constant multipliers such as the
    attention 1/√d into the preceding weights).

    A multi-signature file (toolchain/export/pipeline.py) has one subgraph per signature and runs a layer in several of
    them: pass one list of layer names (and one constant set) per subgraph. Each layer's entry then holds its
    op in the first subgraph that runs it (``subgraph``, ``input``, ``output``, ``weight``, ``fused_activation``,
    ``factor``) and ``sites``: one such dict per subgraph that runs it. Raises ExportError when a layer a
    subgraph runs (not folded to a constant) has no op there."""
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model_from_bytearray(bytearray(float_bytes))
    if layer_names and isinstance(layer_names[0], str) or not layer_names:
        layer_names, constant = [list(layer_names)], [set(constant)]
    names = op_names()
    codes = [fbu.get_builtin_code_from_operator_code(c) for c in model.operatorCodes]
    found: dict[str, dict[str, Any]] = {}
    for index, (wanted, const) in enumerate(zip(layer_names, constant)):
        sg = model.subgraphs[index]
        by_shape: dict[tuple, list[dict[str, Any]]] = {}
        for op in sg.operators:
            kind = names.get(codes[op.opcodeIndex])
            if kind not in ("CONV_2D", "FULLY_CONNECTED"):
                continue
            w = sg.tensors[op.inputs[1]]
            fused = getattr(getattr(op, "builtinOptions", None), "fusedActivationFunction", 0) or 0
            data = model.buffers[w.buffer].data
            if data is None or len(data) == 0:
                continue
            raw = np.asarray(data, np.uint8).view(np.float32)  # a view of the parsed buffer: no per-weight copies (GBs at 512 px)
            by_shape.setdefault(tuple(int(d) for d in w.shape), []).append({
                "op": kind, "input": tensor_name(sg.tensors[op.inputs[0]]), "output": tensor_name(sg.tensors[op.outputs[0]]),
                "weight": tensor_name(w), "fused_activation": int(fused), "values": raw, "peak": float(np.abs(raw).max())})
        for name in wanted:
            w = tflite_layout(module.get_submodule(name).weight_float.detach())
            ours = _normalised(w)
            pool = by_shape.get(tuple(w.shape), [])
            probe = np.linspace(0, ours.size - 1, num=min(ours.size, 256)).astype(np.int64)  # cheap rejection before the full compare
            hit = next((c for c in pool if np.allclose(c["values"][probe] / max(c["peak"], 1e-30), ours[probe], atol=1e-5)
                        and np.allclose(c["values"] / max(c["peak"], 1e-30), ours, atol=1e-5)), None)
            if hit is None and name in const:
                continue  # folded into a constant by the converter
            if hit is None:
                # Not reached, as far as tested, by checkpoints `toolchain quantize` writes in the default scope: an online
                # transform right after a plain conv (PassionSR's LET) is folded into that conv by export_module (a test), and
                # the balancing methods fold those pairs offline. Left for what a custom --include may bring in.
                raise ExportError(f"layer {name}: no CONV_2D/FULLY_CONNECTED op with its weights in the converted TFLite graph "
                                  "(the converter changed it; it cannot be quantized with the checkpoint's scales; "
                                  "--target onnx exports it)")
            pool.remove(hit)
            # the positive factor the converter folded into this layer's weights (1 for most layers)
            factor = hit["peak"] / max(float(np.abs(w).max()), 1e-30)
            site = {**{k: v for k, v in hit.items() if k not in ("values", "peak")}, "factor": factor, "subgraph": index}
            if name in found:
                found[name]["sites"].append(site)
            else:
                found[name] = {**site, "sites": [site]}
    return found
