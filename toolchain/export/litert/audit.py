"""Read an integer TFLite back and audit it against the checkpoint: per-layer quantization parameters and
stored weights, and which ops run on integer vs float inputs. Everything is read from the flatbuffer itself,
every subgraph (a pipeline file has one per signature, toolchain/export/pipeline.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from toolchain.export.description import LayerSpec
from toolchain.export.litert.locate import op_names, tensor_name, tflite_layout
from toolchain.export.litert.weights import weight_ints


def _type_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    return {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_") and isinstance(v, int)}


def _site_row(model, site: dict[str, Any], p: dict[str, Any], act, module: torch.nn.Module, name: str, types: dict[int, str]) -> dict[str, Any]:
    """One op of a layer (one signature's) read back: executed types, input scale/zero point, weight scales and integers."""
    sg = model.subgraphs[site["subgraph"]]
    op = next((o for o in sg.operators if len(o.outputs) and tensor_name(sg.tensors[o.outputs[0]]) == site["output"]), None)
    if op is None or len(op.inputs) < 2:
        return {"executed": "missing", "integer": False}
    tin, w = sg.tensors[op.inputs[0]], sg.tensors[op.inputs[1]]
    in_dtype, w_dtype = types.get(tin.type, "?"), types.get(w.type, "?")
    row: dict[str, Any] = {"executed_activation": in_dtype,
                           "executed_weight": "int4" if p["w_container"] == 4 and w_dtype in ("int8", "int4") else w_dtype,
                           "integer": in_dtype in ("int8", "int16") and w_dtype in ("int8", "int4")}
    qin = tin.quantization
    s_in = np.asarray(qin.scale if qin is not None and qin.scale is not None else [], np.float32)
    z_in = np.asarray(qin.zeroPoint if qin is not None and qin.zeroPoint is not None else [], np.int64)
    if len(s_in):
        row["tflite_act_scale"], row["tflite_act_zero_point"] = float(s_in[0]), int(z_in[0])
        if p["a_container"] == 8:
            row["act_scale_matches"] = abs(float(s_in[0]) - act.scale) <= 1e-6 * act.scale
            row["act_zero_point_matches"] = int(z_in[0]) == act.zero_point - 128 if not act.symmetric else int(z_in[0]) == 0
    qw = w.quantization
    ws = np.asarray(qw.scale if qw is not None and qw.scale is not None else [], np.float32)
    if len(ws):
        layer = module.get_submodule(name)
        ratio = ws / np.maximum(layer.design_weight_scale.numpy(), 1e-30)
        # one common factor = a constant the converter folded into the weights; the integer grid is unchanged
        row["weight_scale_factor"] = float(np.median(ratio))
        stored = weight_ints(model, op.inputs[1], p["w_container"], site["subgraph"])
        row["weight_grid_matches"] = bool(np.max(np.abs(ratio / np.median(ratio) - 1)) <= 1e-5) and \
            np.array_equal(stored, tflite_layout(layer.design_weight_int).ravel())
    return row


def read_back(qbytes: bytes, plan: dict[str, dict[str, Any]], layers: dict[str, LayerSpec], module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Compare the TFLite quantization parameters of every layer in ``plan`` with the checkpoint's: layer →
    designed vs executed activation/weight types, the input scale and zero point, the weight scale factor
    and whether the stored weight integers equal the design (``weight_grid_matches``).

    A layer that runs in several signatures (``plan[name]["sites"]``) is read back in each: the row is its first
    op's, ``signatures`` counts its ops, and ``integer``, ``act_scale_matches``, ``act_zero_point_matches`` and
    ``weight_grid_matches`` hold only if they hold in every one of them."""
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model_from_bytearray(bytearray(qbytes))
    types = _type_names()
    table: dict[str, dict[str, Any]] = {}
    for name, p in plan.items():
        act = layers[name].act
        row: dict[str, Any] = {"designed_a_bits": act.bits, "designed_w_bits": layers[name].w_bits, "op": p["op"],
                               "clamp_to_designed_range": bool(act.clamp)}
        sites = [_site_row(model, s, p, act, module, name, types) for s in p.get("sites", [{**p, "subgraph": 0}])]
        row.update(sites[0])
        for key in ("integer", "act_scale_matches", "act_zero_point_matches", "weight_grid_matches"):
            if any(key in s for s in sites):
                row[key] = all(bool(s.get(key)) for s in sites)
        if len(sites) > 1:
            row["signatures"] = len(sites)
            row["same_in_every_signature"] = all({k: s.get(k) for k in ("executed_activation", "executed_weight", "tflite_act_scale",
                                                                        "tflite_act_zero_point", "weight_scale_factor")}
                                                 == {k: sites[0].get(k) for k in ("executed_activation", "executed_weight",
                                                                                  "tflite_act_scale", "tflite_act_zero_point",
                                                                                  "weight_scale_factor")} for s in sites)
        table[name] = row
    return table


def op_census(tflite: bytes, subgraph: int = 0) -> dict[str, Any]:
    """Op types of one subgraph (0: the only one, or a pipeline file's ``restore``) and whether each runs on
    integer or float inputs."""
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model_from_bytearray(bytearray(tflite))
    names = op_names()
    codes = [fbu.get_builtin_code_from_operator_code(c) for c in model.operatorCodes]
    types = _type_names()
    sg = model.subgraphs[subgraph]
    integer: dict[str, int] = {}
    floating: dict[str, int] = {}
    for op in sg.operators:
        first = next((i for i in op.inputs if i >= 0), None)
        kind = names.get(codes[op.opcodeIndex], str(codes[op.opcodeIndex]))
        target = integer if first is not None and types.get(sg.tensors[first].type, "") in ("int8", "int16", "uint8") else floating
        target[kind] = target.get(kind, 0) + 1
    return {"integer_ops": integer, "float_ops": floating}
