"""Write the checkpoint's weight integers and per-channel scales into the quantized flatbuffer (biases
requantized to s_x·s_w), and read stored weight integers back."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from toolchain.export.int4 import pack_int4, unpack_int4
from toolchain.export.litert.locate import tensor_name, tflite_layout
from toolchain.errors import ExportError


def write_checkpoint_weights(qbytes: bytes, plan: dict[str, dict[str, Any]], module: torch.nn.Module) -> bytes:
    """Replace the quantizer's own weight grids with the checkpoint's integers and per-channel scales.

    ai-edge-quantizer derives weight scales from max|W|/qmax of its container, which equals the design only when
    every channel reaches qmax; learned or clipped scales, 5–6-bit designs and 4-bit designs in int8 containers
    would be re-gridded. Writing W_int and s (times the factor the converter folded in) makes the TFLite weights
    exactly the checkpoint's; biases are requantized to the new s_x·s_w.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model_from_bytearray(bytearray(qbytes))
    op_by_output = [{tensor_name(sg.tensors[op.outputs[0]]): op for op in sg.operators if len(op.outputs)} for sg in model.subgraphs]
    users: dict[int, set[str]] = {}  # weight/bias buffer → the layers whose ops read it (a pipeline file shares buffers across signatures)
    sites = []
    for name, p in plan.items():
        for site in p.get("sites", [{**p, "subgraph": 0}]):
            op = op_by_output[site["subgraph"]].get(site["output"])
            if op is None:
                raise ExportError(f"layer {name}: its op ({site['output']}) is missing from the quantized TFLite graph")
            sites.append((name, p, site, op))
            sg = model.subgraphs[site["subgraph"]]
            for k in op.inputs[1:3]:
                if k >= 0:
                    users.setdefault(sg.tensors[k].buffer, set()).add(name)
    ours = {(site["subgraph"], k) for _, _, site, op in sites for k in op.inputs[1:3] if k >= 0}
    for i, sg in enumerate(model.subgraphs):  # any other tensor on those buffers is another reader
        for k, t in enumerate(sg.tensors):
            if t.buffer in users and (i, k) not in ours:
                users[t.buffer].add("another tensor")
    written: dict[int, np.ndarray] = {}  # buffer → the scale written with it (shared buffers are written once)
    for name, p, site, op in sites:
        layer = module.get_submodule(name)
        sg = model.subgraphs[site["subgraph"]]
        wt, xt = sg.tensors[op.inputs[1]], sg.tensors[op.inputs[0]]
        want = schema.TensorType.INT4 if p["w_container"] == 4 else schema.TensorType.INT8
        if wt.type != want or users[wt.buffer] != {name}:
            raise ExportError(f"layer {name}: the quantizer stored its weights unexpectedly (type {wt.type}, shared buffer: "
                              f"{sorted(users[wt.buffer] - {name})[:3] or 'no'})")
        scale = (layer.design_weight_scale.double().numpy() * site["factor"]).astype(np.float32)
        if wt.buffer in written:  # the same weights in another signature: they must be the same design
            if not np.array_equal(written[wt.buffer], scale):
                raise ExportError(f"layer {name}: its signatures share a weight buffer but the converter folded different factors")
        else:
            w_int = tflite_layout(layer.design_weight_int)
            model.buffers[wt.buffer].data = pack_int4(w_int) if p["w_container"] == 4 else w_int.astype(np.int8).view(np.uint8).ravel()
            written[wt.buffer] = scale
        wt.quantization.scale = scale
        wt.quantization.zeroPoint = np.zeros(scale.size, np.int64)
        wt.quantization.quantizedDimension = 0
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            bt = sg.tensors[op.inputs[2]]
            if users[bt.buffer] != {name}:
                raise ExportError(f"layer {name}: its bias buffer is shared with {sorted(users[bt.buffer] - {name})[:3]}")
            new = (float(xt.quantization.scale[0]) * scale.astype(np.float64)).astype(np.float32)
            if bt.buffer in written:
                if not np.array_equal(written[bt.buffer], new):
                    raise ExportError(f"layer {name}: its signatures share a bias buffer at different scales")
                bt.quantization.scale = new
                bt.quantization.zeroPoint = np.zeros(new.size, np.int64)
            else:
                _requantize_bias(model, bt, scale, float(xt.quantization.scale[0]), name)
                written[bt.buffer] = new
    return bytes(fbu.convert_object_to_bytearray(model))


def _requantize_bias(model, bt, new_w_scale: np.ndarray, in_scale: float, name: str) -> None:
    from ai_edge_litert import schema_py_generated as schema

    dtypes = {schema.TensorType.INT32: np.int32, schema.TensorType.INT64: np.int64}
    if bt.type not in dtypes:
        raise ExportError(f"layer {name}: unexpected bias type {bt.type} in the quantized graph")
    dtype = dtypes[bt.type]
    old = np.asarray(bt.quantization.scale, np.float64)
    values = np.frombuffer(bytes(model.buffers[bt.buffer].data), dtype=dtype).astype(np.float64) * old
    new = (in_scale * new_w_scale.astype(np.float64)).astype(np.float32)
    info = np.iinfo(dtype)
    model.buffers[bt.buffer].data = np.clip(np.round(values / new), info.min, info.max).astype(dtype).view(np.uint8)
    bt.quantization.scale = new
    bt.quantization.zeroPoint = np.zeros(new.size, np.int64)


def weight_ints(model, tensor_index: int, container: int, subgraph: int = 0) -> np.ndarray:
    """The integers stored for one weight tensor (int4 unpacked) of a parsed model, in TFLite layout, flattened."""
    t = model.subgraphs[subgraph].tensors[tensor_index]
    raw = np.asarray(model.buffers[t.buffer].data, np.uint8)
    count = int(np.prod(t.shape))
    return unpack_int4(raw, count) if container == 4 else raw.view(np.int8)[:count]
