"""ONNX backend: export-ready module → QDQ-annotated ONNX (opset 21), checked and validated.

* QuantizeLinear/DequantizeLinear around every quantized conv/matmul input (uint8/int8 container,
  preceded by a Clip to the designed range for 3–6-bit layers; int16 containers above 8 bits) and
  DequantizeLinear on every quantized weight (INT4 initializers for ≤ 4-bit weights, int8 else).
* Online Hadamard transforms are ``quantface.HadamardNCHW`` / ``quantface.HadamardLast`` nodes backed
  by local functions (onnxscript), so ONNX Runtime executes them and compilers see them by name.
* Low-rank branches are float16 initializers cast to float.
* ``qdq_format="ort"``: every quantized conv/linear with an 8-bit input grid becomes a node unit ONNX
  Runtime fuses (DQ → Conv/MatMul ← DQ(int8 weight) [← DQ(int32 bias)] → Q → DQ): QLinearConv,
  QLinearMatMul, QGemm. Its output Q is an 8-bit requantization the fake-quant model does not have,
  calibrated on sample inputs (``calibrate_output_grids``); ``ort_fused_nodes`` counts what ORT fused.
* Models over 2 GB are written with external data (``model.onnx`` + ``model.onnx.data``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from export.hadamard_onnx import DOMAIN, function_protos
from export.parts import part_module
from export.prepare import export_module
from toolchain.errors import ExportError

OPSET = 21
_TWO_GB = 2**31 - 1


def _pack_int4(values: np.ndarray) -> bytes:
    v = (values.astype(np.int8).reshape(-1) & 0x0F).astype(np.uint8)
    if v.size % 2:
        v = np.concatenate([v, np.zeros(1, np.uint8)])
    return (v[0::2] | (v[1::2] << 4)).tobytes()


def _to_int4(init: onnx.TensorProto) -> None:
    arr = onnx.numpy_helper.to_array(init)
    if arr.min() < -8 or arr.max() > 7:
        raise ExportError(f"initializer {init.name} holds values outside the int4 range")
    dims, name = list(init.dims), init.name
    init.Clear()
    init.name = name
    init.data_type = onnx.TensorProto.INT4
    init.dims.extend(dims)
    init.raw_data = _pack_int4(arr)


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


def finalize(proto: onnx.ModelProto, layer_info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Turn the traced graph into the exported one, in place: Hadamard local functions attached,
    16-bit activation containers retyped to UINT16, ≤ 4-bit weights packed as INT4 initializers.
    ``layer_info``: layer name → ExportQuantLayer.describe(); the name "" stands for a graph of one
    layer traced alone (its weight initializer is plain ``weight_int``). Returns counts for the report."""
    uint16 = _uint16_containers(proto)
    used = {n.op_type for n in proto.graph.node if n.domain == DOMAIN}
    if used:
        proto.functions.extend(function_protos(used))
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    int4, int8 = [], []
    by_name = {i.name: i for i in proto.graph.initializer}
    for layer, info in layer_info.items():
        key = f"{layer}.weight_int" if layer else "weight_int"
        init = next((v for k, v in by_name.items() if k.endswith(key)), None)
        if init is None or info["w_bits"] is None or info.get("weight_container") == "int8":  # ort form: int8 container
            continue
        if info["w_bits"] <= 4:
            _to_int4(init)
            int4.append(layer)
        else:
            int8.append(layer)
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"int4_weight_layers": len(int4), "int8_weight_layers": len(int8), "uint16_activation_layers": uint16,
            "hadamard_functions": sorted(used), "op_counts": ops}


QDQ_FORMATS = ("exact", "ort", "ort-s8")
FUSED_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul")


def default_calib_inputs(model: torch.nn.Module, part: str, images: int = 3) -> list[tuple[torch.Tensor, ...]]:
    """Inputs of ``part`` for the bundled faces (calibration/faces), degraded to LQ at the model's input size;
    used for the ``ort`` format's output grids when export is given no calibration set."""
    from calibration import BUNDLED_FACES
    from calibration.dataset import CalibrationSet, build_calibration_set
    from export.parts import part_inputs

    with tempfile.TemporaryDirectory() as tmp:
        root = build_calibration_set([BUNDLED_FACES], Path(tmp) / "set", n=images, size=model.image_size, seed=0, progress=False)
        batches = CalibrationSet.open(root).batches(model.image_size, 1)
    return part_inputs(model, part, batches)


@torch.no_grad()
def calibrate_output_grids(module: torch.nn.Module, wrapped: torch.nn.Module, calib_inputs: list[tuple[torch.Tensor, ...]]
                           ) -> dict[str, tuple[float, float]]:
    """Set the uint8 output grid of every ``ort``-flavour layer of ``module`` that runs in ``wrapped``.

    Runs ``wrapped`` (a part of ``module``) on each input tuple with the output grids off — the values the
    fake-quant model computes — and fits each layer's grid to its conv/matmul output (bias included,
    low-rank branch not): the least-squared-error range among min/max shrunk by 0–60 %
    (``export.prepare.output_grid``). Returns layer → (range lo, range hi, SQNR dB of the grid on the
    sampled outputs) for the layers that ran; layers of other parts are left uncalibrated (they are not
    in the graph). Raises ExportError with no inputs."""
    from export.prepare import ExportQuantLayer, output_grid

    if not calib_inputs:
        raise ExportError("the ort QDQ format needs sample inputs to calibrate the op output grids")
    layers = {n: m for n, m in module.named_modules() if isinstance(m, ExportQuantLayer) and m.flavour == "ort"}
    for layer in layers.values():
        layer.output_range, layer.output_samples = (), []
        layer.out_calibrated = False
    grids: dict[str, tuple[float, float, float]] = {}
    try:
        for inp in calib_inputs:
            wrapped(*inp)
        for n, layer in layers.items():
            if layer.output_range:
                grids[n] = output_grid(torch.cat(layer.output_samples), *layer.output_range)
    finally:
        for layer in layers.values():
            layer.output_range, layer.output_samples = None, []
    for n, (lo, hi, _) in grids.items():
        layers[n].set_output_range(lo, hi)
    return grids


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


def ort_fused_nodes(path: str | os.PathLike) -> dict[str, int]:
    """What ONNX Runtime's own QDQ transformer makes of the graph at ``path``: op type → count for the
    fused integer ops (FUSED_OPS) in the session-optimised model (ORT_ENABLE_EXTENDED: the level that
    runs the QDQ selector/action fusions; no hardware-specific layout changes), plus the remaining
    ``DequantizeLinear`` / ``QuantizeLinear`` counts. Raises onnxruntime's error for an invalid graph."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        nodes = onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node
    counts = {op: 0 for op in FUSED_OPS + ("QuantizeLinear", "DequantizeLinear")}
    for n in nodes:
        if n.op_type in counts:
            counts[n.op_type] += 1
    return counts


def export_onnx(model: torch.nn.Module, out: str | os.PathLike, part: str = "full", dynamic: bool = False, opset: int = OPSET,
                qdq_format: str = "exact", calib_inputs: list[tuple[torch.Tensor, ...]] | None = None) -> dict[str, Any]:
    """Export ``model`` (float or quantized) to ``out``; returns a report (sizes, counts, layer table).

    ``qdq_format``: ``"exact"`` (default) — the checkpoint's designed grids, exact in a default ORT session;
    ``"ort"`` — node units ORT fuses into integer ops (see the module docstring), with op output grids
    calibrated on ``calib_inputs`` (input tuples of ``part``; None: the bundled faces). The ``ort`` report
    adds ``ort_layers`` (layers in the fusable form), ``ort_fallback_layers`` (layer → why not) and
    ``ort_fused_nodes`` (ort_fused_nodes of the written file; ``fused_total`` should equal ``ort_layers``).
    Raises ExportError for an unknown format, for ``ort`` on a model with no fusable layer, and for
    anything the exporter cannot represent (naming the layer)."""
    out = Path(out)
    if qdq_format not in QDQ_FORMATS:
        raise ExportError(f"unknown QDQ format '{qdq_format}' (choose from {', '.join(QDQ_FORMATS)})")
    fused_format = qdq_format.startswith("ort")
    module, layer_info = export_module(model, "ort" if fused_format else "qdq", int8_weights=qdq_format == "ort-s8")
    wrapped, inputs, in_names, out_names = part_module(module, part)
    ort_report: dict[str, Any] = {}
    if fused_format:
        from export.prepare import ExportQuantLayer

        fusable = [n for n, m in module.named_modules() if isinstance(m, ExportQuantLayer) and m.flavour == "ort"]
        if not fusable:
            reasons = sorted({i.get("ort_fallback", "not quantized") for i in layer_info.values()}) or ["the model has no quantized layers"]
            raise ExportError(f"--qdq-format ort: no layer can form a fusable QDQ node unit ({'; '.join(reasons)[:300]}); "
                              "use --qdq-format exact")
        if calib_inputs is None:
            calib_inputs = default_calib_inputs(model, part)
        ranges = calibrate_output_grids(module, wrapped, calib_inputs)
        for n, (lo, hi, sqnr) in ranges.items():
            layer_info[n]["output_grid"] = {"lo": lo, "hi": hi, "sqnr_db": round(sqnr, 2)}
        worst = sorted(ranges, key=lambda n: ranges[n][2])[:5]
        in_graph = {n for n, m in module.named_modules() if isinstance(m, ExportQuantLayer)}
        ort_report = {"ort_layers": len(ranges),
                      "ort_fallback_layers": {n: i["ort_fallback"] for n, i in layer_info.items() if "ort_fallback" in i and n in in_graph},
                      "output_grid_sqnr_db_worst": {n: round(ranges[n][2], 2) for n in worst},
                      "output_requantization": "ort format: every fused conv/matmul output is requantized to uint8 (least-squares range over "
                                               f"{len(calib_inputs)} calibration input(s)); the fake-quant model keeps these outputs in float"}
    padded = False
    if dynamic:  # any height/width: pad to the multiple the skip Concats need, crop back (export.parts)
        from export.parts import pad_for_dynamic

        wrapped, padded = pad_for_dynamic(wrapped, model.config, part)
    axes = {}
    if dynamic:
        for name, t in zip(in_names + out_names, list(inputs) + [None] * len(out_names)):
            axes[name] = {0: "batch", 2: "height", 3: "width"} if t is None or t.dim() == 4 else {0: "batch"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(wrapped, inputs, str(raw), dynamo=False, opset_version=opset, input_names=in_names, output_names=out_names,
                              dynamic_axes=axes or None, do_constant_folding=True)
        proto = onnx.load(str(raw), load_external_data=True)
        report = finalize(proto, layer_info)
        if fused_format:
            ort_report["requantizations_merged"] = merge_requantizations(proto)
        if dynamic:  # say which spatial sizes the graph accepts (its skip Concats fail on others)
            from export.parts import spatial_multiple

            report["spatial_multiple"] = spatial_multiple(model.config, part)
            report["pads_to_multiple"] = padded
            onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                                "quantface_spatial_multiple": str(report["spatial_multiple"]),
                                                "quantface_pads_to_multiple": str(padded).lower()})
        external = sum(len(i.raw_data) for i in proto.graph.initializer) > _TWO_GB - 64 * 2**20  # serialisation limit
        try:
            if not external:
                onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"exported graph fails onnx.checker: {str(exc).splitlines()[0][:300]}") from None
        staged = Path(tmp) / out.name
        onnx.save_model(proto, str(staged), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=out.name + ".data" if external else None)
        if external:  # the checker reads large models from disk
            try:
                onnx.checker.check_model(str(staged))
            except onnx.checker.ValidationError as exc:
                raise ExportError(f"exported graph fails onnx.checker: {str(exc).splitlines()[0][:300]}") from None
        out.parent.mkdir(parents=True, exist_ok=True)
        for f in Path(tmp).iterdir():
            if f.name.startswith(out.name):
                os.replace(f, out.parent / f.name)
    files = [out] + ([out.parent / (out.name + ".data")] if external else [])
    if fused_format:
        ort_report["ort_fused_nodes"] = fused = ort_fused_nodes(out)
        fused["fused_total"] = sum(fused[op] for op in FUSED_OPS)
        report.update(ort_report)
    report.update({
        "qdq_format": qdq_format, "path": str(out), "part": part, "opset": opset, "dynamic": dynamic, "external_data": external,
        "bytes": sum(f.stat().st_size for f in files), "seconds": round(time.perf_counter() - t0, 2),
        "inputs": {n: list(t.shape) for n, t in zip(in_names, inputs)}, "outputs": out_names, "layers": layer_info,
    })
    return report


def ort_session(path: str | os.PathLike | bytes, threads: int | None = None, optimize: bool = True):
    """A *default* ONNX Runtime CPU session — what a user gets from ``InferenceSession(path)`` —
    or, with ``optimize=False``, one with every graph optimisation off (the ONNX reference
    semantics of the QDQ graph). ``threads`` sets intra-op threads (None: ORT's default).

    The exported graphs need no session options to be exact: activations and 5–8-bit weights are
    unsigned (u8·u8 kernels, no saturation on AVX2), narrowing clips act on integers, biases are
    separate Adds (export/ops.py, export/prepare.py).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(path: str | os.PathLike, inputs: dict[str, np.ndarray], threads: int | None = None) -> list[np.ndarray]:
    return ort_session(path, threads).run(None, inputs)


def reference_outputs(model: torch.nn.Module, part: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """What the PyTorch (fake-quant or float) model computes for the same part and inputs."""
    wrapped, _, _, _ = part_module(model, part)
    with torch.no_grad():
        return wrapped(*inputs)


def compare(a: np.ndarray, b: np.ndarray, image: bool) -> dict[str, float]:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    res = {"max_abs_error": float(diff.max()), "mean_abs_error": float(diff.mean())}
    if image:  # [-1, 1] images → PSNR on the [0, 1] scale
        mse = float(((diff / 2.0) ** 2).mean())
        res["psnr_db"] = float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))
    return res


def copy_external(src: Path, dst: Path) -> None:
    shutil.copy2(src, dst)
    if (src.parent / (src.name + ".data")).exists():
        shutil.copy2(src.parent / (src.name + ".data"), dst.parent / (dst.name + ".data"))
