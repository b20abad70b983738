"""ONNX target: export description → QDQ-annotated ONNX (opset 21), checked, and validated in ONNX Runtime.

* QuantizeLinear/DequantizeLinear around every quantized conv/matmul input (uint8/int8 container,
  preceded by a Clip to the designed range for 3–6-bit layers; int16 containers above 8 bits) and
  DequantizeLinear on every quantized weight (INT4 initializers for ≤ 4-bit weights, int8 else).
* Online Hadamard transforms are ``quantface.HadamardNCHW`` / ``quantface.HadamardLast`` nodes backed
  by local functions (onnxscript), so ONNX Runtime executes them and compilers see them by name.
* Low-rank branches are float16 initializers cast to float.
* ``qdq_format="ort"``: every quantized conv/linear with an 8-bit input grid becomes a node unit ONNX
  Runtime fuses (DQ → Conv/MatMul ← DQ(int8 weight) [← DQ(int32 bias)] → Q → DQ): QLinearConv,
  QLinearMatMul, QGemm. Its output Q is an 8-bit requantization the fake-quant model does not have,
  calibrated on sample inputs (toolchain/export/qdq/output_grids.py); ``ort_fused_nodes`` counts what ORT fused.
* Models over 2 GB are written with external data (``model.onnx`` + ``model.onnx.data``).

The graph steps live in toolchain/export/qdq/ (graph.py: finalize/merge/save; runtime.py: ORT sessions;
output_grids.py; layer_parity.py); validation is the shared toolchain/export/validate.py.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import torch

from toolchain.export.backend import ExportOptions, Inputs
from toolchain.export.parts import part_module
from toolchain.export.prepare import ExportQuantLayer, export_module, store_float_weights_fp16, with_float16_weights
from toolchain.export.qdq.graph import finalize, merge_requantizations, move_group, save_checked, trace
from toolchain.export.qdq.runtime import FUSED_OPS, ort_fused_nodes, ort_session
from toolchain.errors import ExportError

OPSET = 21
FLOAT16_LAYERS_KEY = "quantface_float16_layers"  # ONNX metadata: JSON list of the float layers stored in float16


def _ort_format(desc, wrapped, model, options: ExportOptions) -> dict[str, Any]:
    """Calibrate the ``ort`` format's op output grids; returns the report's ort_* entries."""
    from toolchain.export.qdq.output_grids import calibrate_output_grids, default_calib_inputs

    module = desc.module
    fusable = [n for n, m in module.named_modules() if isinstance(m, ExportQuantLayer) and m.flavour == "ort"]
    if not fusable:
        reasons = sorted({s.ort_fallback or "not quantized" for s in desc.layers.values()}) or ["the model has no quantized layers"]
        raise ExportError(f"--qdq-format ort: no layer can form a fusable QDQ node unit ({'; '.join(reasons)[:300]}); "
                          "use --qdq-format exact")
    calib_inputs = options.calib_inputs if options.calib_inputs is not None else default_calib_inputs(model, options.part)
    ranges = calibrate_output_grids(module, wrapped, calib_inputs)
    for n, (lo, hi, sqnr) in ranges.items():
        desc.layers[n].output_grid = {"lo": lo, "hi": hi, "sqnr_db": round(sqnr, 2)}
    worst = sorted(ranges, key=lambda n: ranges[n][2])[:5]
    return {"ort_layers": len(ranges),
            "ort_fallback_layers": {n: s.ort_fallback for n, s in desc.layers.items() if s.ort_fallback},
            "output_grid_sqnr_db_worst": {n: round(ranges[n][2], 2) for n in worst},
            "output_requantization": "ort format: every fused conv/matmul output is requantized to uint8 (least-squares range over "
                                     f"{len(calib_inputs)} calibration input(s)); the fake-quant model keeps these outputs in float"}


def export_onnx(model: torch.nn.Module, out: str | Path, options: ExportOptions | None = None, **kwargs) -> dict[str, Any]:
    """Export ``model`` (float or quantized) to ``out``; returns a report (sizes, counts, layer table).

    ``options`` (or the same fields as keywords: part, dynamic, opset, qdq_format, calib_inputs): see
    ExportOptions. ``qdq_format``: ``"exact"`` (default) — the checkpoint's designed grids, exact in a
    default ORT session; ``"ort"`` — node units ORT fuses into integer ops (see the module docstring), with
    op output grids calibrated on ``calib_inputs`` (input tuples of ``part``; None: the bundled faces);
    ``"ort-s8"`` — ``ort`` with 8-bit weights in int8. The ``ort`` report adds ``ort_layers`` (layers in
    the fusable form), ``ort_fallback_layers`` (layer → why not) and ``ort_fused_nodes`` (ort_fused_nodes of
    the written file; ``fused_total`` should equal ``ort_layers``). Raises ExportError for an unknown format,
    for ``ort`` on a model with no fusable layer, and for anything the exporter cannot represent (naming the layer)."""
    options = options or ExportOptions(**kwargs)
    options.check("onnx")
    out = Path(out)
    qdq_format = options.qdq_format or "exact"
    fused_format = qdq_format.startswith("ort")
    desc = export_module(model, "ort" if fused_format else "qdq", int8_weights=qdq_format == "ort-s8")
    quantized = any(s.w_bits is not None or s.act is not None for s in desc.layers.values())
    float_weights = options.float_weights if options.float_weights != "auto" else ("fp16" if quantized else "fp32")
    float16_layers = store_float_weights_fp16(desc.module) if float_weights == "fp16" else []
    wrapped, inputs, in_names, out_names = part_module(desc.module, options.part)
    ort_report = _ort_format(desc, wrapped, model, options) if fused_format else {}
    # --part full: one graph for the whole pipeline with the stage tensors as named extra outputs and the stage table in
    # the metadata (toolchain/export/pipeline.py); a --dynamic export keeps the single-output graph (its crop back to the input
    # size ties the decoder to the input's shape, so the decoder stage could not be cut out on its own)
    pipeline = options.part == "full" and not options.dynamic
    if pipeline:
        from toolchain.export.pipeline import OnnxPipeline, onnx_output_names

        wrapped, out_names = OnnxPipeline(desc.module).eval(), onnx_output_names(desc.module)
    padded = False
    axes = {}
    if options.dynamic:  # any height/width: pad to the multiple the skip Concats need, crop back (export.parts)
        from toolchain.export.parts import pad_for_dynamic

        wrapped, padded = pad_for_dynamic(wrapped, model.config, options.part)
        for name, t in zip(in_names + out_names, list(inputs) + [None] * len(out_names)):
            axes[name] = {0: "batch", 2: "height", 3: "width"} if t is None or t.dim() == 4 else {0: "batch"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        raw = Path(tmp) / "raw.onnx"
        proto = trace(wrapped, inputs, raw, options.opset, in_names, out_names, axes)
        report = finalize(proto, desc.layers)
        if fused_format:
            ort_report["requantizations_merged"] = merge_requantizations(proto)
        # the file says which float layers it stores in float16, so validation rounds the reference alike
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                            FLOAT16_LAYERS_KEY: json.dumps(float16_layers)})
        if options.dynamic:  # say which spatial sizes the graph accepts (its skip Concats fail on others)
            from toolchain.export.parts import spatial_multiple

            report["spatial_multiple"] = spatial_multiple(model.config, options.part)
            report["pads_to_multiple"] = padded
            onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                                "quantface_spatial_multiple": str(report["spatial_multiple"]),
                                                "quantface_pads_to_multiple": str(padded).lower()})
        if pipeline:
            from toolchain.export.pipeline import STAGES_KEY, onnx_stage_table

            table = onnx_stage_table(desc.module)
            onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, STAGES_KEY: json.dumps(table)})
            report["signatures"] = {k: {"part": v["part"], "inputs": v["shapes"], "output": v["outputs"][0]} for k, v in table.items()}
        external = save_checked(proto, Path(tmp) / out.name)
        files = move_group(Path(tmp), out)
    if fused_format:
        ort_report["ort_fused_nodes"] = fused = ort_fused_nodes(out)
        fused["fused_total"] = sum(fused[op] for op in FUSED_OPS)
        report.update(ort_report)
    report.update({
        "target": "onnx", "qdq_format": qdq_format, "path": str(out), "part": options.part, "opset": options.opset,
        "dynamic": options.dynamic, "external_data": external, "bytes": sum(f.stat().st_size for f in files),
        "seconds": round(time.perf_counter() - t0, 2), "inputs": {n: list(t.shape) for n, t in zip(in_names, inputs)},
        "outputs": out_names, "layers": desc.report_layers(), "float_weights": float_weights,
        "float16_layers": len(float16_layers),
    })
    return report


def validate_onnx(path: str | Path, model: torch.nn.Module, part: str, inputs: Inputs, threads: int | None = None) -> dict[str, Any]:
    """The exported graph in a *default* ORT session (``default``, what ``InferenceSession(path)`` gives)
    and with every graph optimisation off (``no_optimizations``, the ONNX reference semantics) vs the
    PyTorch model (toolchain/export/validate.py: validate_runs) — with the float layers the file stores in float16
    (its metadata) rounded alike, so the figure measures the export, not that storage choice. ORT's float conv sums depend on its thread count,
    so at ≤ 4-bit activations the end-to-end figure can differ between thread counts by a cascade of
    rounding flips (the per-layer check cannot); pass ``threads`` to make a figure reproducible."""
    from toolchain.export.validate import validate_runs

    sessions = {"default": ort_session(path, threads), "no_optimizations": ort_session(path, threads, optimize=False)}
    float16 = json.loads(sessions["default"].get_modelmeta().custom_metadata_map.get(FLOAT16_LAYERS_KEY, "[]"))
    reference = with_float16_weights(model, float16) if float16 else model

    def runner(sess, names=None):
        names = names or [i.name for i in sess.get_inputs()]
        first = sess.get_outputs()[0].name
        return lambda inp: sess.run([first], {n: t.numpy() for n, t in zip(names, inp)})[0]

    threads_used = threads or sessions["default"].get_session_options().intra_op_num_threads or "ORT default (physical cores)"
    extra = {"ort_threads": threads_used, "float16_layers": len(float16)}
    if float16:
        extra["reference"] = "the PyTorch model with its float (not quantized) layers' weights rounded to float16, as the file stores them"
    summary = validate_runs({k: runner(s) for k, s in sessions.items()}, reference, part, inputs, "onnx", extra)
    from toolchain.export.pipeline import onnx_stage, onnx_stages, signature_inputs, RESTORE

    stages = onnx_stages(sessions["default"]) if part == "full" else None
    if not stages:
        return summary
    # a pipeline file: every stage cut out of it (what an ORT Mobile / NPU user runs per stage) vs its PyTorch part
    proto = onnx.load(str(path))
    per_stage = signature_inputs(reference, [inp[0] for inp in inputs])
    stage_sessions, results = {}, {RESTORE: summary}
    for key, spec in stages.items():
        if key == RESTORE:
            continue
        data = onnx_stage(proto, key).SerializeToString()
        stage_sessions[key] = {"default": ort_session(data, threads), "no_optimizations": ort_session(data, threads, optimize=False)}
        results[key] = validate_runs({k: runner(s, spec["inputs"]) for k, s in stage_sessions[key].items()}, reference, spec["part"],
                                     per_stage[key], "onnx")
    summary = dict(summary)
    summary["signatures"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("note", "cpu")} for k, v in results.items()}
    from toolchain.export.pipeline import signatures_of
    from toolchain.export.tflite_backend import stage_chain_check
    from toolchain.export.validate import compare

    runners = {k: runner(v["default"], stages[k]["inputs"]) for k, v in stage_sessions.items()}
    runners[RESTORE] = runner(sessions["default"])
    summary["stage_chain"] = stage_chain_check(runners, signatures_of(model), [inp[0] for inp in inputs], compare)
    return summary


class OnnxBackend:
    """``--target onnx`` (toolchain/export/backend.py: ExportBackend)."""

    target = "onnx"
    suffix = ".onnx"

    def export(self, model: torch.nn.Module, out: Path, options: ExportOptions) -> dict[str, Any]:
        return export_onnx(model, out, options)

    def validate(self, path: Path, model: torch.nn.Module, options: ExportOptions, inputs: Inputs) -> dict[str, Any]:
        return validate_onnx(path, model, options.part, inputs)
