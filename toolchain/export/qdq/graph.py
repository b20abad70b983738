"""The ONNX graph steps after tracing: Hadamard local functions attached, 16-bit activation containers
retyped to UINT16, ≤ 4-bit weights packed as INT4 initializers, requantization pairs merged (the ``ort``
format), and the checked, atomic write of the model file (external data above 2 GB)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from toolchain.export.description import LayerSpec
from toolchain.export.hadamard_onnx import DOMAIN, function_protos
from toolchain.export.int4 import pack_int4
from toolchain.errors import ExportError

_TWO_GB = 2**31 - 1


def _to_int4(init: onnx.TensorProto) -> None:
    arr = onnx.numpy_helper.to_array(init)
    if arr.min() < -8 or arr.max() > 7:
        raise ExportError(f"initializer {init.name} holds values outside the int4 range")
    dims, name = list(init.dims), init.name
    init.Clear()
    init.name = name
    init.data_type = onnx.TensorProto.INT4
    init.dims.extend(dims)
    init.raw_data = pack_int4(arr).tobytes()


def _resolve(proto: onnx.ModelProto, name: str) -> onnx.TensorProto | None:
    """The initializer or Constant value behind ``name``, through Identity nodes; None if computed."""
    inits = {i.name: i for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    while name not in inits:
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            return node.attribute[0].t
        if node.op_type != "Identity":
            return None
        name = node.input[0]
    return inits[name]


def _uint16_containers(proto: onnx.ModelProto) -> int:
    """Retype the 16-bit activation QDQ (traced with int32 zero points and clip bounds, since
    TorchScript has no uint16 export) to UINT16 constants: Q → [Clip] → DQ. Returns how many."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    count = 0
    for q in [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]:
        zp = _resolve(proto, q.input[2])
        if zp is None or zp.data_type != onnx.TensorProto.INT32:
            continue

        def u16(src: str, tag: str) -> str:
            value = onnx.numpy_helper.to_array(_resolve(proto, src)).astype(np.int64)
            if value.min() < 0 or value.max() > 65535:
                raise ExportError(f"{q.name}: a 16-bit activation bound {value} lies outside uint16")
            name = f"{q.name}/{tag}_uint16"
            proto.graph.initializer.append(onnx.numpy_helper.from_array(value.astype(np.uint16), name))
            return name

        zp_name = u16(q.input[2], "zero_point")
        q.input[2] = zp_name
        nxt = consumers.get(q.output[0], [])
        for n in nxt:
            if n.op_type == "Clip":
                n.input[1], n.input[2] = u16(n.input[1], "q_lo"), u16(n.input[2], "q_hi")
                nxt = nxt + consumers.get(n.output[0], [])
        for n in nxt:
            if n.op_type == "DequantizeLinear":
                n.input[2] = zp_name
        count += 1
    return count


def trace(module: Any, inputs: tuple[Any, ...], f: str | os.PathLike | Any, opset: int, input_names: list[str],
          output_names: list[str], dynamic_axes: dict[str, dict[int, str]] | None = None) -> onnx.ModelProto:
    """The TorchScript-traced ONNX graph of ``module`` on ``inputs`` (torch tensors), written to ``f`` (a path or a
    binary buffer) and returned loaded (external data read in). Constant folding on, the tracer's warnings silenced
    (shape asserts and folding notes bury the progress line). The one export call of both the whole-part export
    (toolchain/export/onnx_backend.py) and the per-layer models of toolchain/export/qdq/layer_parity.py; the graph
    still needs ``finalize``."""
    import io
    import warnings

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, f if isinstance(f, io.IOBase) else str(f), dynamo=False, opset_version=opset,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes or None, do_constant_folding=True)
    if isinstance(f, io.BytesIO):
        return onnx.load_from_string(f.getvalue())
    return onnx.load(str(f), load_external_data=True)


def finalize(proto: onnx.ModelProto, layers: dict[str, LayerSpec]) -> dict[str, Any]:
    """Turn the traced graph into the exported one, in place: Hadamard local functions attached,
    16-bit activation containers retyped to UINT16, ≤ 4-bit weights packed as INT4 initializers.
    ``layers``: layer name → LayerSpec; the name "" stands for a graph of one layer traced alone (its
    weight initializer is plain ``weight_int``). Returns counts for the report."""
    uint16 = _uint16_containers(proto)
    float16 = 0
    for n in proto.graph.node:  # toolchain/export/ops.py Fp16Weight: float16 initializer → Cast to float32
        if n.domain == DOMAIN and n.op_type == "Float16Weight":
            n.op_type, n.domain = "Cast", ""
            n.attribute.append(onnx.helper.make_attribute("to", onnx.TensorProto.FLOAT))
            float16 += 1
    used = {n.op_type for n in proto.graph.node if n.domain == DOMAIN}
    if used:
        proto.functions.extend(function_protos(used))
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    int4, int8 = [], []
    by_name = {i.name: i for i in proto.graph.initializer}
    for layer, spec in layers.items():
        key = f"{layer}.weight_int" if layer else "weight_int"
        init = next((v for k, v in by_name.items() if k.endswith(key)), None)
        if init is None or spec.w_bits is None or spec.weight_container == "int8":  # ort form: int8 container
            continue
        if spec.w_bits <= 4:
            _to_int4(init)
            int4.append(layer)
        else:
            int8.append(layer)
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"int4_weight_layers": len(int4), "int8_weight_layers": len(int8), "uint16_activation_layers": uint16,
            "float16_initializers": float16,
            "hadamard_functions": sorted(used), "op_counts": ops}


def merge_requantizations(proto: onnx.ModelProto) -> int:
    """Q1 → DQ1 → Q2 → DQ2 (an op output requantized, then at once quantized again for the next layer)
    becomes Q1' → DQ2 with Q1' = Q1 on Q2's grid: the op output is quantized once, with the next layer's
    scale and zero point. ORT's DoubleQDQPairsRemover makes the same change in a default session, but its
    merged grid then kept the next conv from fusing (tiny model, decoder conv_in: ORT 1.32), so the
    graph is written merged. Only where DQ1 feeds Q2 alone, nothing else reads DQ1, and Q1/Q2 have the
    same container type; returns the number of pairs merged."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in proto.graph.output}
    drop: set[int] = set()
    merged = 0
    for q2 in [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]:
        dq1 = producer.get(q2.input[0])
        if dq1 is None or dq1.op_type != "DequantizeLinear" or dq1.output[0] in outputs or len(consumers.get(dq1.output[0], [])) != 1:
            continue
        q1 = producer.get(dq1.input[0])
        if q1 is None or q1.op_type != "QuantizeLinear" or len(consumers.get(q1.output[0], [])) != 1 or len(q2.input) < 3:
            continue
        z1, z2 = _resolve(proto, q1.input[2]), _resolve(proto, q2.input[2])
        if z1 is None or z2 is None or z1.data_type != z2.data_type or not all(c.op_type == "DequantizeLinear" for c in consumers.get(q2.output[0], [])):
            continue
        q1.input[1], q1.input[2] = q2.input[1], q2.input[2]
        for c in consumers.get(q2.output[0], []):
            c.input[:] = [q1.output[0] if i == q2.output[0] else i for i in c.input]
        drop |= {id(dq1), id(q2)}
        merged += 1
    keep = [n for n in proto.graph.node if id(n) not in drop]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    used = {i for n in proto.graph.node for i in n.input}
    inits = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(inits)
    return merged


def save_checked(proto: onnx.ModelProto, staged: Path) -> bool:
    """Check ``proto`` with onnx.checker (full check; from disk when it is too large to serialise) and write
    it to ``staged`` (with ``<name>.data`` external data above the 2 GB protobuf limit). Returns whether
    external data was used. Raises ExportError with the checker's first line."""
    external = sum(len(i.raw_data) for i in proto.graph.initializer) > _TWO_GB - 64 * 2**20  # serialisation limit
    try:
        if not external:
            onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported graph fails onnx.checker: {str(exc).splitlines()[0][:300]}") from None
    onnx.save_model(proto, str(staged), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=staged.name + ".data" if external else None)
    if external:  # the checker reads large models from disk
        try:
            onnx.checker.check_model(str(staged))
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"exported graph fails onnx.checker: {str(exc).splitlines()[0][:300]}") from None
    return external


def move_group(tmp: Path, out: Path) -> list[Path]:
    """Move ``out.name`` and its ``.data`` file from ``tmp`` beside ``out`` (os.replace); returns the files."""
    out.parent.mkdir(parents=True, exist_ok=True)
    moved = []
    for f in Path(tmp).iterdir():
        if f.name.startswith(out.name):
            os.replace(f, out.parent / f.name)
            moved.append(out.parent / f.name)
    return moved
