"""ONNX backend: export-ready module → QDQ-annotated ONNX (opset 21), checked and validated.

* QuantizeLinear/DequantizeLinear around every quantized conv/matmul input (uint8/int8 container,
  preceded by a Clip to the designed range for 3–6-bit layers; int16 containers above 8 bits) and
  DequantizeLinear on every quantized weight (INT4 initializers for ≤ 4-bit weights, int8 else).
* Online Hadamard transforms are ``quantface.HadamardNCHW`` / ``quantface.HadamardLast`` nodes backed
  by local functions (onnxscript), so ONNX Runtime executes them and compilers see them by name.
* Low-rank branches are float16 initializers cast to float.
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


def _postprocess(proto: onnx.ModelProto, layer_info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    used = {n.op_type for n in proto.graph.node if n.domain == DOMAIN}
    if used:
        proto.functions.extend(function_protos(used))
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    int4, int8 = [], []
    by_name = {i.name: i for i in proto.graph.initializer}
    for layer, info in layer_info.items():
        key = f"{layer}.weight_int"
        init = next((v for k, v in by_name.items() if k.endswith(key)), None)
        if init is None or info["w_bits"] is None:
            continue
        if info["w_bits"] <= 4:
            _to_int4(init)
            int4.append(layer)
        else:
            int8.append(layer)
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"int4_weight_layers": len(int4), "int8_weight_layers": len(int8), "hadamard_functions": sorted(used), "op_counts": ops}


def export_onnx(model: torch.nn.Module, out: str | os.PathLike, part: str = "full", dynamic: bool = False, opset: int = OPSET) -> dict[str, Any]:
    """Export ``model`` (float or quantized) to ``out``; returns a report (sizes, counts, layer table)."""
    out = Path(out)
    module, layer_info = export_module(model)
    wrapped, inputs, in_names, out_names = part_module(module, part)
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
        report = _postprocess(proto, layer_info)
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
    report.update({
        "path": str(out), "part": part, "opset": opset, "dynamic": dynamic, "external_data": external,
        "bytes": sum(f.stat().st_size for f in files), "seconds": round(time.perf_counter() - t0, 2),
        "inputs": {n: list(t.shape) for n, t in zip(in_names, inputs)}, "outputs": out_names, "layers": layer_info,
    })
    return report


DISABLED_ORT_OPTIMIZERS = ["WeightBiasQuantization", "ConvAddActivationFusion", "ConvActivationFusion", "QDQPropagationTransformer", "MatMulAddFusion"]


def ort_session(path: str | os.PathLike, threads: int | None = None, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # keep QDQ semantics for MatMulNBits
    if threads:
        so.intra_op_num_threads = threads
    # * WeightBiasQuantization rewrites float conv biases as int32 at scale s_x·s_w; with 3–6-bit
    #   designs that step is coarse (≈0.05 on a 4-bit layer) and changes results, while the
    #   checkpoint's biases are float.
    # * ConvAddActivationFusion / ConvActivationFusion fold the Clip that narrows the *next* layer's
    #   activation range into the producing Conv; when that Conv/Add output also feeds a residual
    #   path, the clip then wrongly applies there too (0.8 error measured on the tiny UNet).
    # * signed-int8 activation QDQ trips QDQPropagation / MatMulAddFusion in ORT 1.32 (UPSTREAM.md).
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED_ORT_OPTIMIZERS)


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
