"""Read an integer TFLite back and audit it against the checkpoint: per-layer quantization parameters and
stored weights, and which ops run on integer vs float inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from export.description import LayerSpec
from export.litert.locate import tflite_layout
from export.litert.weights import weight_ints


def read_back(qbytes: bytes, plan: dict[str, dict[str, Any]], layers: dict[str, LayerSpec], module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Compare the TFLite quantization parameters of every layer in ``plan`` with the checkpoint's: layer →
    designed vs executed activation/weight types, the input scale and zero point, the weight scale factor
    and whether the stored weight integers equal the design (``weight_grid_matches``)."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    it = Interpreter(model_content=qbytes)
    parsed = fbu.read_model_from_bytearray(bytearray(qbytes))
    by_index = {d["index"]: d for d in it.get_tensor_details()}
    # the quantizer inserts QUANTIZE ops and renames tensors: find each layer's op by its output name
    op_by_output = {by_index[o["outputs"][0]]["name"]: o for o in it._get_ops_details() if len(o["outputs"]) and o["outputs"][0] >= 0}
    table: dict[str, dict[str, Any]] = {}
    for name, p in plan.items():
        act = layers[name].act
        op = op_by_output.get(p["output"])
        tin = by_index.get(op["inputs"][0]) if op else None
        w = by_index.get(op["inputs"][1]) if op else None
        row: dict[str, Any] = {"designed_a_bits": act.bits, "designed_w_bits": layers[name].w_bits, "op": p["op"],
                               "clamp_to_designed_range": bool(act.clamp)}
        if tin is None or w is None:
            row.update({"executed": "missing", "integer": False})
            table[name] = row
            continue
        in_dtype = np.dtype(tin["dtype"]).name
        w_dtype = np.dtype(w["dtype"]).name
        s_in = tin["quantization_parameters"]["scales"]
        z_in = tin["quantization_parameters"]["zero_points"]
        row.update({"executed_activation": in_dtype, "executed_weight": "int4" if p["w_container"] == 4 and w_dtype in ("int8", "int4") else w_dtype,
                    "integer": in_dtype in ("int8", "int16") and w_dtype in ("int8", "int4")})
        if len(s_in):
            row["tflite_act_scale"], row["tflite_act_zero_point"] = float(s_in[0]), int(z_in[0])
            if p["a_container"] == 8:
                row["act_scale_matches"] = abs(float(s_in[0]) - act.scale) <= 1e-6 * act.scale
                row["act_zero_point_matches"] = int(z_in[0]) == act.zero_point - 128 if not act.symmetric else int(z_in[0]) == 0
        ws = w["quantization_parameters"]["scales"]
        if len(ws):
            layer = module.get_submodule(name)
            ratio = ws / np.maximum(layer.design_weight_scale.numpy(), 1e-30)
            # one common factor = a constant the converter folded into the weights; the integer grid is unchanged
            row["weight_scale_factor"] = float(np.median(ratio))
            stored = weight_ints(parsed, op["inputs"][1], p["w_container"])
            row["weight_grid_matches"] = bool(np.max(np.abs(ratio / np.median(ratio) - 1)) <= 1e-5) and \
                np.array_equal(stored, tflite_layout(layer.design_weight_int).ravel())
        table[name] = row
    return table


def op_census(tflite: bytes) -> dict[str, Any]:
    """Op types and whether each runs on integer or float inputs."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=tflite)
    details = it.get_tensor_details()
    dtype_of = {d["index"]: np.dtype(d["dtype"]).name for d in details}
    integer: dict[str, int] = {}
    floating: dict[str, int] = {}
    for op in it._get_ops_details():
        first = next((i for i in op["inputs"] if i >= 0), None)
        kind = op["op_name"]
        target = integer if first is not None and dtype_of.get(first, "") in ("int8", "int16", "uint8") else floating
        target[kind] = target.get(kind, 0) + 1
    return {"integer_ops": integer, "float_ops": floating}
