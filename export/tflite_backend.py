"""TFLite backend: export-ready module → float TFLite (litert-torch) → integer TFLite with the
checkpoint's own scales (ai-edge-quantizer recipes + injected ranges).

Why this route (README "TFLite route"): onnx2tf cannot carry QDQ scales into an integer TFLite,
and litert-torch's PT2E quantizer silently mis-quantized layers when probed. Here:

1. the float flavour of the folded model (dequantized weights W_int·s, a clamp to each layer's
   designed activation range, float Hadamard and low-rank branch ops) is converted by litert-torch;
2. every quantized conv/linear is found in the flatbuffer by its weight values and gets an
   exact-scope ai-edge-quantizer recipe (CONV_2D / FULLY_CONNECTED, a8 or a16, w4 or w8);
3. each layer's *input* range is the checkpoint's, so the int8 scale and zero point equal ours (the
   clamp makes 3–6-bit designs exact inside the int8 container); the ranges of the op *outputs*
   (requantized by LiteRT) come from running the PyTorch float flavour on the calibration inputs;
4. the quantizer's own weight grids are replaced by the checkpoint's integers and per-channel scales
   (biases requantized to match), in int4 or int8 containers;
5. the result is checked: each layer's TFLite input scale/zero point, weight scales and stored weight
   integers are read back and compared with the checkpoint, and ops that did not become integer are listed.

TFLite has no sub-8-bit activation kernels: ≤ 8 designed bits execute as int8, more as int16
(symmetric, slow reference kernels on CPU). Deviations from the fake-quant model: conv outputs
are requantized to int8 with calibrated ranges, biases become int32 at s_x·s_w, and ops between
quantized layers run in float (DEQUANTIZE/QUANTIZE around them).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.aeq_compat import large_conv_weights_fixed
from export.parts import part_module
from export.prepare import export_module
from toolchain.errors import ExportError
from toolchain.io.atomic import atomic_write_bytes, atomic_write_json

METADATA_KEY = "quantface_precision"


def convert_float(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> bytes:
    import litert_torch

    with tempfile.TemporaryDirectory() as tmp:
        edge = litert_torch.convert(module.eval(), inputs)
        edge.export(str(Path(tmp) / "float.tflite"))
        return (Path(tmp) / "float.tflite").read_bytes()


def _op_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}


def _tensor_name(t) -> str:
    return t.name.decode() if isinstance(t.name, bytes) else t.name


def _tflite_layout(w: torch.Tensor) -> np.ndarray:
    return (w.permute(0, 2, 3, 1) if w.dim() == 4 else w).contiguous().numpy()  # TFLite conv weights are OHWI


def _normalised(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64).ravel()
    return v / max(float(np.abs(v).max()), 1e-30)


def layer_usage(module: torch.nn.Module, wrapped: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[set[str], set[str]]:
    """(layers the exported part runs, those of them whose input does not depend on the part's input).

    A part (e.g. the UNet) runs only some of the model's layers; a constant-input layer (e.g. the time
    embedding of a one-step model) is folded into a constant by the converter, so it has no op to quantize."""
    from export.prepare import ExportQuantLayer

    seen: dict[str, list[tuple]] = {}

    def fingerprint(t: torch.Tensor) -> tuple:  # not the tensor: at 512 px the inputs of all layers would take > 10 GB
        flat = t.detach().reshape(-1)
        return tuple(t.shape), float(flat.double().sum()), float(flat.abs().double().sum()), tuple(flat[:: max(1, flat.numel() // 64)].tolist())

    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, []).append(fingerprint(a[0])))
             for n, m in module.named_modules() if isinstance(m, ExportQuantLayer)]
    try:
        with torch.no_grad():
            wrapped(*inputs)
            wrapped(*[t + 0.25 * torch.randn(t.shape, generator=torch.Generator().manual_seed(7)) for t in inputs])
    finally:
        for h in hooks:
            h.remove()
    return set(seen), {n for n, xs in seen.items() if len(xs) == 2 and xs[0] == xs[1]}


def match_layers(float_bytes: bytes, module: torch.nn.Module, layer_names: list[str], constant: set[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Quantized layer → its CONV_2D / FULLY_CONNECTED op (input/output/weight tensor names), found by
    weight values up to a positive global factor (the converter folds constant multipliers such as the
    attention 1/√d into the preceding weights)."""
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model_from_bytearray(bytearray(float_bytes))
    sg = model.subgraphs[0]
    names = _op_names()
    codes = [fbu.get_builtin_code_from_operator_code(c) for c in model.operatorCodes]
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
            "op": kind, "input": _tensor_name(sg.tensors[op.inputs[0]]), "output": _tensor_name(sg.tensors[op.outputs[0]]),
            "weight": _tensor_name(w), "fused_activation": int(fused), "values": raw, "peak": float(np.abs(raw).max())})
    found: dict[str, dict[str, Any]] = {}
    for name in layer_names:
        w = _tflite_layout(module.get_submodule(name).weight_float.detach())
        ours = _normalised(w)
        pool = by_shape.get(tuple(w.shape), [])
        probe = np.linspace(0, ours.size - 1, num=min(ours.size, 256)).astype(np.int64)  # cheap rejection before the full compare
        hit = next((c for c in pool if np.allclose(c["values"][probe] / max(c["peak"], 1e-30), ours[probe], atol=1e-5)
                    and np.allclose(c["values"] / max(c["peak"], 1e-30), ours, atol=1e-5)), None)
        if hit is None and name in constant:
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
        found[name] = {**{k: v for k, v in hit.items() if k not in ("values", "peak")}, "factor": factor}
    return found


def _container(bits: int) -> int:
    if bits <= 8:
        return 8
    if bits <= 16:
        return 16
    raise ExportError(f"{bits}-bit activations have no TFLite container")


def _designed_range(act: dict[str, Any], container_bits: int) -> tuple[float, float]:
    """Range to hand the quantizer so its int8/int16 scale equals the designed scale."""
    s, lo = act["scale"], act["lo"]
    if container_bits == 8:
        return lo, lo + 255.0 * s
    bound = max(abs(act["lo"]), abs(act["hi"]))  # int16 is symmetric in TFLite: nearest representable design
    return -bound, bound


WEIGHT_CONTAINERS = ("auto", "int8")


def _weight_container(w_bits: int, policy: str) -> int:
    """``auto``: int4 storage for ≤ 4-bit weights (smallest file); ``int8``: every weight in int8 (the 4-bit grid kept
    exactly), which CPU runtimes such as XNNPACK run on their fast int8 path."""
    if policy not in WEIGHT_CONTAINERS:
        raise ExportError(f"unknown weight container '{policy}' (choose from {', '.join(WEIGHT_CONTAINERS)})")
    return 4 if w_bits <= 4 and policy == "auto" else 8


# TFLite ActivationFunctionType → the interval its fused activation maps outputs into
_FUSED_CLIP = {0: (-np.inf, np.inf), 1: (0.0, np.inf), 2: (-1.0, 1.0), 3: (0.0, 6.0)}


def _after_fused_activation(rng: list[float], fused: int, name: str) -> tuple[float, float]:
    if fused not in _FUSED_CLIP:
        raise ExportError(f"layer {name}: the converter fused activation type {fused} into its op; its output range is unknown")
    lo, hi = _FUSED_CLIP[fused]
    return float(np.clip(rng[0], lo, hi)), float(np.clip(rng[1], lo, hi))


def output_ranges(module: torch.nn.Module, wrapped: torch.nn.Module, calib_inputs: list[tuple[torch.Tensor, ...]],
                  names: list[str]) -> dict[str, tuple[float, float]]:
    """Range of each quantized conv/linear's own output (before any low-rank branch is added) over the calibration
    inputs, from the PyTorch float flavour: the same values the float TFLite computes, without running a TFLite
    calibration interpreter that keeps every intermediate tensor (> 24 GB at 512 px)."""
    layers = {n: module.get_submodule(n) for n in names}
    for layer in layers.values():
        layer.output_range = ()
    try:
        with torch.no_grad():
            for inp in calib_inputs:
                wrapped(*inp)
        missing = [n for n, layer in layers.items() if not layer.output_range]
        if missing:
            raise ExportError(f"layers {missing[:3]} did not run on the calibration inputs; their output ranges are unknown")
        return {n: layer.output_range for n, layer in layers.items()}
    finally:
        for layer in layers.values():
            layer.output_range = None


def quantize_with_checkpoint_ranges(float_bytes: bytes, module: torch.nn.Module, wrapped: torch.nn.Module,
                                    info: dict[str, dict[str, Any]], calib_inputs: list[tuple[torch.Tensor, ...]],
                                    constant: set[str], weight_container: str = "auto") -> tuple[bytes, dict[str, Any]]:
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer import quantizer as aeq

    quant_layers = [n for n, d in info.items() if d.get("act") is not None and d["w_bits"] is not None]
    ops = match_layers(float_bytes, module, quant_layers, constant)
    q = aeq.Quantizer(bytearray(float_bytes))
    plan: dict[str, dict[str, Any]] = {}
    for name in ops:
        d, op = info[name], ops[name]
        a_cont = _container(d["act"]["bits"])
        if d["w_bits"] > 8:
            raise ExportError(f"layer {name}: {d['w_bits']}-bit weights are not supported by TFLite kernels")
        w_cont = _weight_container(d["w_bits"], weight_container)
        # an op's scope is its output tensor names joined with ";" plus a trailing ";"
        q.add_static_config(f"^{re.escape(op['output'])};$", getattr(qtyping.TFLOperationName, op["op"]), a_cont, w_cont)
        plan[name] = {**op, "a_container": a_cont, "w_container": w_cont}
    outputs = output_ranges(module, wrapped, calib_inputs, list(plan))
    calib: dict[str, dict[str, np.ndarray]] = {}
    for name, p in plan.items():
        lo, hi = _designed_range(info[name]["act"], p["a_container"])
        calib[p["input"]] = {"min": np.array([lo], np.float32), "max": np.array([hi], np.float32)}
        # the converter folds a positive factor into some weights (and biases): the op's output is scaled alike
        out_lo, out_hi = _after_fused_activation([v * p["factor"] for v in outputs[name]], p["fused_activation"], name)
        calib[p["output"]] = {"min": np.array([out_lo], np.float32), "max": np.array([out_hi], np.float32)}
    with large_conv_weights_fixed():
        result = q.quantize(calib, enable_progress_report=False)
    return write_checkpoint_weights(bytes(result.quantized_model), plan, module), plan


def _pack_int4(values: np.ndarray) -> np.ndarray:
    """Two signed 4-bit values per byte, the first in the low nibble (TFLite's INT4 buffer layout)."""
    v = values.astype(np.int8).ravel()
    if v.size % 2:
        v = np.concatenate([v, np.zeros(1, np.int8)])
    return ((v[0::2].astype(np.uint8) & 0x0F) | ((v[1::2].astype(np.uint8) & 0x0F) << 4)).astype(np.uint8)


def _unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    b = packed.astype(np.uint8)
    out = np.empty(b.size * 2, np.int8)
    out[0::2], out[1::2] = (b & 0x0F).astype(np.int8), (b >> 4).astype(np.int8)
    out[out > 7] -= 16
    return out[:count]


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
    sg = model.subgraphs[0]
    op_by_output = {_tensor_name(sg.tensors[op.outputs[0]]): op for op in sg.operators if len(op.outputs)}
    users: dict[int, int] = {}
    for t in sg.tensors:
        users[t.buffer] = users.get(t.buffer, 0) + 1
    for name, p in plan.items():
        layer = module.get_submodule(name)
        op = op_by_output.get(p["output"])
        if op is None:
            raise ExportError(f"layer {name}: its op ({p['output']}) is missing from the quantized TFLite graph")
        wt, xt = sg.tensors[op.inputs[1]], sg.tensors[op.inputs[0]]
        want = schema.TensorType.INT4 if p["w_container"] == 4 else schema.TensorType.INT8
        if wt.type != want or users[wt.buffer] != 1:
            raise ExportError(f"layer {name}: the quantizer stored its weights unexpectedly (type {wt.type}, shared buffer: {users[wt.buffer] > 1})")
        w_int = _tflite_layout(layer.design_weight_int)
        scale = (layer.design_weight_scale.double().numpy() * p["factor"]).astype(np.float32)
        model.buffers[wt.buffer].data = _pack_int4(w_int) if p["w_container"] == 4 else w_int.astype(np.int8).view(np.uint8).ravel()
        wt.quantization.scale = scale
        wt.quantization.zeroPoint = np.zeros(scale.size, np.int64)
        wt.quantization.quantizedDimension = 0
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            _requantize_bias(model, sg.tensors[op.inputs[2]], scale, float(xt.quantization.scale[0]), name)
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


def read_back(qbytes: bytes, plan: dict[str, dict[str, Any]], info: dict[str, dict[str, Any]], module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Compare the TFLite quantization parameters of every layer with the checkpoint's."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    it = Interpreter(model_content=qbytes)
    parsed = fbu.read_model_from_bytearray(bytearray(qbytes))
    by_index = {d["index"]: d for d in it.get_tensor_details()}
    # the quantizer inserts QUANTIZE ops and renames tensors: find each layer's op by its output name
    op_by_output = {by_index[o["outputs"][0]]["name"]: o for o in it._get_ops_details() if len(o["outputs"]) and o["outputs"][0] >= 0}
    table: dict[str, dict[str, Any]] = {}
    for name, p in plan.items():
        act = info[name]["act"]
        op = op_by_output.get(p["output"])
        tin = by_index.get(op["inputs"][0]) if op else None
        w = by_index.get(op["inputs"][1]) if op else None
        row: dict[str, Any] = {"designed_a_bits": act["bits"], "designed_w_bits": info[name]["w_bits"], "op": p["op"],
                               "clamp_to_designed_range": bool(act["clamp"])}
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
                row["act_scale_matches"] = abs(float(s_in[0]) - act["scale"]) <= 1e-6 * act["scale"]
                row["act_zero_point_matches"] = int(z_in[0]) == act["zero_point"] - 128 if not act["symmetric"] else int(z_in[0]) == 0
        ws = w["quantization_parameters"]["scales"]
        if len(ws):
            layer = module.get_submodule(name)
            ratio = ws / np.maximum(layer.design_weight_scale.numpy(), 1e-30)
            # one common factor = a constant the converter folded into the weights; the integer grid is unchanged
            row["weight_scale_factor"] = float(np.median(ratio))
            stored = weight_ints(parsed, op["inputs"][1], p["w_container"])
            row["weight_grid_matches"] = bool(np.max(np.abs(ratio / np.median(ratio) - 1)) <= 1e-5) and \
                np.array_equal(stored, _tflite_layout(layer.design_weight_int).ravel())
        table[name] = row
    return table


def weight_ints(model, tensor_index: int, container: int) -> np.ndarray:
    """The integers stored for one weight tensor (int4 unpacked) of a parsed model, in TFLite layout, flattened."""
    t = model.subgraphs[0].tensors[tensor_index]
    raw = np.asarray(model.buffers[t.buffer].data, np.uint8)
    count = int(np.prod(t.shape))
    return _unpack_int4(raw, count) if container == 4 else raw.view(np.int8)[:count]


def add_metadata(tflite: bytes, key: str, payload: dict[str, Any]) -> bytes:
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model_from_bytearray(bytearray(tflite))
    buf = schema.BufferT()
    buf.data = np.frombuffer(json.dumps(payload).encode(), dtype=np.uint8)
    model.buffers.append(buf)
    meta = schema.MetadataT()
    meta.name = key
    meta.buffer = len(model.buffers) - 1
    model.metadata = (model.metadata or []) + [meta]
    return bytes(fbu.convert_object_to_bytearray(model))


def read_metadata(tflite: bytes, key: str = METADATA_KEY) -> dict[str, Any] | None:
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model_from_bytearray(bytearray(tflite))
    for m in model.metadata or []:
        name = m.name.decode() if isinstance(m.name, bytes) else m.name
        if name == key:
            return json.loads(bytes(model.buffers[m.buffer].data).decode())
    return None


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


def run_tflite(tflite: bytes, inputs: tuple[torch.Tensor, ...], threads: int | None = None, xnnpack: bool = True) -> np.ndarray:
    """Run the default signature on ``inputs`` (float32 tensors) in LiteRT's interpreter and return
    the first output. ``xnnpack=True`` is the default interpreter (XNNPACK delegate applied, as in
    apps); ``False`` uses the built-in reference/optimized kernels only."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_content=tflite, num_threads=threads, experimental_op_resolver_type=resolver)
    runner = it.get_signature_runner()
    out = runner(**{f"args_{i}": t.numpy() for i, t in enumerate(inputs)})
    return next(iter(out.values()))


def export_tflite(model: torch.nn.Module, out: str | os.PathLike, part: str = "full", meta: dict | None = None,
                  mp_table: str | os.PathLike | None = None, validate_inputs: list[tuple[torch.Tensor, ...]] | None = None,
                  calib_inputs: list[tuple[torch.Tensor, ...]] | None = None, weight_container: str = "auto") -> dict[str, Any]:
    """Write ``out`` (integer TFLite, or float for a float model) and ``<stem>_float.tflite``; return a report.

    ``weight_container``: ``auto`` stores ≤ 4-bit weights as int4 (smallest), ``int8`` stores all weights as int8
    (same integers; faster on CPU runtimes without int4 conv kernels)."""
    _weight_container(4, weight_container)  # fail on a bad policy before the slow conversion
    out = Path(out)
    t0 = time.perf_counter()
    module, info = export_module(model, "float")
    wrapped, inputs, in_names, _ = part_module(module, part)
    float_bytes = convert_float(wrapped, inputs)
    float_path = out.with_name(out.stem + "_float.tflite")
    atomic_write_bytes(float_path, float_bytes)
    report: dict[str, Any] = {"path": str(out), "float_path": str(float_path), "part": part, "float_bytes": len(float_bytes)}
    executed, constant = layer_usage(module, wrapped, inputs)
    info = {n: d for n, d in info.items() if n in executed}
    quantized = any(d.get("act") is not None for d in info.values())
    if not quantized:
        atomic_write_bytes(out, float_bytes)
        report.update({"bytes": len(float_bytes), "quantized": False})
        return report
    calib_inputs = calib_inputs or validate_inputs
    if not calib_inputs:
        raise ExportError("an integer TFLite export needs calibration images for the op outputs (--calib)")
    qbytes, plan = quantize_with_checkpoint_ranges(float_bytes, module, wrapped, info, calib_inputs, constant, weight_container)
    table = read_back(qbytes, plan, info, module)
    folded = sorted(set(n for n, d in info.items() if d.get("act") is not None) - set(plan))
    fallbacks = [n for n, r in table.items() if not r.get("integer")]
    precision = {"format": "quantface-tflite-precision", "version": 1, "part": part, "weight_container": weight_container, "layers": table,
                 "float_fallback_layers": fallbacks, "folded_constant_layers": folded,
                 "notes": "TFLite executes <=8 designed activation bits as int8 with the designed scale (clamped to the designed "
                          "range where narrower than int8), >8 as symmetric int16."}
    qbytes = add_metadata(qbytes, METADATA_KEY, {k: v for k, v in precision.items() if k != "layers"} |
                          {"layers": {n: {k: r.get(k) for k in ("designed_a_bits", "executed_activation", "designed_w_bits", "executed_weight")}
                                      for n, r in table.items()}})
    atomic_write_bytes(out, qbytes)
    atomic_write_json(out.with_suffix(".precision.json"), precision)
    if mp_table:
        _annotate_table(mp_table, table, out.with_suffix(".mp_table.json"))
    report.update({"bytes": len(qbytes), "quantized": True, "layers_quantized": len(table), "float_fallback_layers": fallbacks,
                   "folded_constant_layers": folded,
                   "transforms_folded_into_producers": {n: d["transform_folded_into"] for n, d in info.items() if d.get("transform_folded_into")},
                   "scale_mismatches": [n for n, r in table.items() if r.get("act_scale_matches") is False or r.get("act_zero_point_matches") is False],
                   "ops": op_census(qbytes), "seconds": round(time.perf_counter() - t0, 1),
                   "weight_container": weight_container,
                   "weight_grid_mismatches": [n for n, r in table.items() if r.get("weight_grid_matches") is False],
                   "int4_weight_layers": sum(1 for r in table.values() if r.get("executed_weight") == "int4"),
                   "int8_weight_layers": sum(1 for r in table.values() if r.get("executed_weight") == "int8")})
    if validate_inputs:
        report["validation"] = validate_tflite(qbytes, float_bytes, model, part, validate_inputs)
    return report


def _annotate_table(mp_table: str | os.PathLike, table: dict[str, dict[str, Any]], dst: Path) -> None:
    from toolchain.alloc.table import load_table, save_table

    t = load_table(mp_table)
    for layer in t["layers"]:
        row = table.get(layer["name"])
        if row is None:
            continue
        layer.setdefault("targets", {})["tflite"] = {"container": row.get("executed_activation", "float"), "designed_a_bits": row["designed_a_bits"],
                                                     "clamp": row["clamp_to_designed_range"], "weight_container": row.get("executed_weight", "float")}
    save_table(t, dst)


def validate_tflite(qbytes: bytes, float_bytes: bytes, model: torch.nn.Module, part: str, inputs: list[tuple[torch.Tensor, ...]]) -> dict[str, Any]:
    """Integer TFLite vs the PyTorch fake-quant model and vs full precision (the float TFLite of the same folded network with
    quantizers off is the PyTorch model itself with quantizers off)."""
    from export.onnx_backend import compare
    from toolchain.quant.calibrate import quantizers_off

    from toolchain.profile.cpu import cpu_isa

    image = part in ("full", "vae_decoder")
    rows = []
    for inp in inputs:
        wrapped, _, _, _ = part_module(model, part)
        with torch.no_grad():
            fq = wrapped(*inp).numpy()
            with quantizers_off(model):
                fp = wrapped(*inp).numpy()
        tq = run_tflite(qbytes, inp)  # LiteRT's default interpreter: XNNPACK on
        rows.append({"vs_fake_quant": compare(tq, fq, image), "vs_fp": compare(tq, fp, image), "fake_quant_vs_fp": compare(fq, fp, image),
                     "xnnpack_off_vs_fake_quant": compare(run_tflite(qbytes, inp, xnnpack=False), fq, image)})
    key = "psnr_db" if image else "max_abs_error"
    agg = lambda k: float(np.median([r[k][key] for r in rows]))  # noqa: E731
    return {"images": len(rows), "metric": key, "median_vs_fake_quant": agg("vs_fake_quant"), "median_vs_fp": agg("vs_fp"),
            "median_fake_quant_vs_fp": agg("fake_quant_vs_fp"), "median_xnnpack_off_vs_fake_quant": agg("xnnpack_off_vs_fake_quant"),
            "cpu": cpu_isa(), "per_image": rows}
