"""TFLite target: export-ready module → float TFLite (litert-torch) → integer TFLite with the
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

The steps live in toolchain/export/litert/ (convert, locate, recipe, weights, audit, metadata, runtime);
validation is the shared toolchain/export/validate.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolchain.export.backend import ExportOptions, Inputs
from toolchain.export.litert.audit import op_census, read_back
from toolchain.export.litert.convert import convert_float, layer_usage
from toolchain.export.litert.metadata import METADATA_KEY, add_metadata
from toolchain.export.litert.recipe import quantize_with_checkpoint_ranges
from toolchain.export.litert.runtime import tflite_runner
from toolchain.export.parts import part_module
from toolchain.export.pipeline import RESTORE, convert_signatures, signature_inputs, signatures_of, stage_example_inputs
from toolchain.export.prepare import export_module
from toolchain.errors import ExportError
from toolchain.io.atomic import atomic_write_bytes, atomic_write_json


def export_tflite(model: torch.nn.Module, out: str | Path, options: ExportOptions | None = None, **kwargs) -> dict[str, Any]:
    """Write ``out`` (integer TFLite, or float for a float model) and ``<stem>_float.tflite``; return a report.

    ``options`` (or the same fields as keywords: part, weight_container, calib_inputs, mp_table, meta): see
    ExportOptions. ``weight_container``: ``auto`` stores ≤ 4-bit weights as int4 (smallest), ``int8`` stores
    all weights as int8 (same integers; faster on CPU runtimes without int4 conv kernels). An integer
    export needs ``calib_inputs`` (the op output ranges). Raises ExportError for options TFLite does not
    take, a missing calibration set, and layers the converter changed beyond recognition."""
    options = options or ExportOptions(**kwargs)
    options.check("tflite")  # also the weight container policy, before the slow conversion
    out = Path(out)
    part = options.part
    t0 = time.perf_counter()
    desc = export_module(model, "float")
    module = desc.module
    wrapped, inputs, in_names, _ = part_module(module, part)
    pipeline = part == "full"  # one file: the `restore` signature and one per stage (toolchain/export/pipeline.py)
    signatures = signatures_of(module) if pipeline else {}
    float_bytes = convert_signatures(module) if pipeline else convert_float(wrapped, inputs)
    float_path = out.with_name(out.stem + "_float.tflite")
    atomic_write_bytes(float_path, float_bytes)
    report: dict[str, Any] = {"target": "tflite", "path": str(out), "float_path": str(float_path), "part": part, "float_bytes": len(float_bytes),
                              "precision": options.precision}
    if pipeline:
        examples = stage_example_inputs(module)
        report["signatures"] = {name: {"part": p, "inputs": {n: list(examples[n].shape) for n in ins}, "output": o}
                                for name, (p, ins, o) in signatures.items()}
    if options.precision == "fp16":
        return _export_fp16(float_bytes, out, report, options, inputs, t0)
    executed, constant = layer_usage(module, wrapped, inputs)
    layers = {n: s for n, s in desc.layers.items() if n in executed}
    if not any(s.act is not None for s in layers.values()):
        atomic_write_bytes(out, float_bytes)
        report.update({"bytes": len(float_bytes), "quantized": False})
        return report
    if not options.calib_inputs:
        raise ExportError("an integer TFLite export needs calibration images for the op outputs (--calib)")
    subgraph_layers = constants = None
    if pipeline:  # per signature (= subgraph, in order) the layers it runs and those folded to constants there
        usage = [(executed, constant) if p == "full" else layer_usage(module, part_module(module, p)[0], part_module(module, p)[1])
                 for p, _, _ in signatures.values()]
        subgraph_layers, constants = [u[0] for u in usage], [u[1] for u in usage]
    qbytes, plan = quantize_with_checkpoint_ranges(float_bytes, module, wrapped, layers, options.calib_inputs,
                                                   constants if pipeline else constant, options.weight_container,
                                                   subgraph_layers=subgraph_layers)
    table = read_back(qbytes, plan, layers, module)
    folded = sorted(set(n for n, s in layers.items() if s.act is not None) - set(plan))
    fallbacks = [n for n, r in table.items() if not r.get("integer")]
    precision = {"format": "quantface-tflite-precision", "version": 1, "part": part, "weight_container": options.weight_container,
                 "layers": table, "float_fallback_layers": fallbacks, "folded_constant_layers": folded,
                 "notes": "TFLite executes <=8 designed activation bits as int8 with the designed scale (clamped to the designed "
                          "range where narrower than int8), >8 as symmetric int16."}
    qbytes = add_metadata(qbytes, METADATA_KEY, {k: v for k, v in precision.items() if k != "layers"} |
                          {"layers": {n: {k: r.get(k) for k in ("designed_a_bits", "executed_activation", "designed_w_bits", "executed_weight")}
                                      for n, r in table.items()}})
    atomic_write_bytes(out, qbytes)
    atomic_write_json(out.with_suffix(".precision.json"), precision)
    if options.mp_table:
        _annotate_table(options.mp_table, table, out.with_suffix(".mp_table.json"))
    report.update({"bytes": len(qbytes), "quantized": True, "layers_quantized": len(table), "float_fallback_layers": fallbacks,
                   "folded_constant_layers": folded,
                   "transforms_folded_into_producers": {n: s.transform_folded_into for n, s in layers.items() if s.transform_folded_into},
                   "scale_mismatches": [n for n, r in table.items() if r.get("act_scale_matches") is False or r.get("act_zero_point_matches") is False],
                   "ops": op_census(qbytes), "seconds": round(time.perf_counter() - t0, 1),
                   "weight_container": options.weight_container,
                   "weight_grid_mismatches": [n for n, r in table.items() if r.get("weight_grid_matches") is False],
                   "int4_weight_layers": sum(1 for r in table.values() if r.get("executed_weight") == "int4"),
                   "int8_weight_layers": sum(1 for r in table.values() if r.get("executed_weight") == "int8")})
    if pipeline:  # the same designed layer in several signatures must be the same integer op in each
        report["ops_by_signature"] = {name: op_census(qbytes, k) for k, name in enumerate(signatures)}
        report["signature_mismatches"] = [n for n, r in table.items() if r.get("same_in_every_signature") is False]
        report["layers_in_several_signatures"] = sum(1 for r in table.values() if r.get("signatures", 1) > 1)
    return report


def _export_fp16(float_bytes: bytes, out: Path, report: dict[str, Any], options: ExportOptions, inputs: tuple[torch.Tensor, ...],
                  t0: float) -> dict[str, Any]:
    """Write the float16-weight TFLite; the report adds its drift from the float32 TFLite (PSNR in dB for
    image outputs, else max |Δ|) on ``options.calib_inputs`` (or the part's example input)."""
    from toolchain.export.litert.recipe import float16_weights
    from toolchain.export.validate import compare

    fp16 = float16_weights(float_bytes)
    atomic_write_bytes(out, fp16)
    image = options.part in ("full", "vae_decoder")
    run16, run32 = tflite_runner(fp16), tflite_runner(float_bytes)
    rows = [compare(run16(inp), run32(inp), image) for inp in (options.calib_inputs or [inputs])]
    key = "psnr_db" if image else "max_abs_error"
    report.update({"bytes": len(fp16), "quantized": False, "ops": op_census(fp16), "seconds": round(time.perf_counter() - t0, 1),
                   "fp16_vs_fp32": {"metric": key, "images": len(rows), "median": float(np.median([r[key] for r in rows])),
                                    "worst": (min if image else max)(r[key] for r in rows)},
                   "note": "float16 weights (DEQUANTIZE in front of each op), float activations: for LiteRT's GPU delegate. A "
                           "checkpoint keeps its designed weight grid; its activations are not quantized in this form."})
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


def validate_tflite(path: str | Path | bytes, model: torch.nn.Module, part: str, inputs: Inputs) -> dict[str, Any]:
    """The TFLite file in LiteRT's default interpreter (``xnnpack``, as apps run it) and with its built-in
    kernels alone (``builtin_kernels``) vs the PyTorch fake-quant model and full precision
    (toolchain/export/validate.py: validate_runs).

    A pipeline file (``part="full"``, ``inputs`` = LQ image tuples): the top-level figures are the ``restore``
    signature's; ``signatures`` holds the same comparison for every signature, each on the inputs its stage sees
    in the PyTorch fake-quant pipeline (toolchain/export/pipeline.py: signature_inputs) against that PyTorch part; and
    ``stage_chain`` compares the stage signatures run one after another in LiteRT (each fed the previous one's
    LiteRT output) with the ``restore`` signature (psnr_db / max_abs_error per image, worst over images)."""
    from toolchain.export.validate import compare, validate_runs

    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    name = Path(path).name if not isinstance(path, bytes) else "model"
    from ai_edge_litert.interpreter import Interpreter

    keys = list(Interpreter(model_content=data).get_signature_list())
    if part != "full" or RESTORE not in keys:
        runs = {"xnnpack": tflite_runner(data, name=name), "builtin_kernels": tflite_runner(data, xnnpack=False, name=name)}
        return validate_runs(runs, model, part, inputs, "tflite")
    sigs = signatures_of(model)
    per_sig = signature_inputs(model, [inp[0] for inp in inputs])
    results = {}
    for key, (p, _, _) in sigs.items():
        runs = {"xnnpack": tflite_runner(data, signature=key, name=name),
                "builtin_kernels": tflite_runner(data, xnnpack=False, signature=key, name=name)}
        results[key] = validate_runs(runs, model, p, per_sig[key], "tflite")
    summary = dict(results[RESTORE])
    summary["signatures"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("note", "cpu")} for k, v in results.items()}
    summary["stage_chain"] = stage_chain_check({k: tflite_runner(data, signature=k, name=name) for k in sigs}, sigs,
                                               [inp[0] for inp in inputs], compare)
    return summary


def stage_chain_check(runners: dict[str, Any], sigs: dict[str, tuple[str, tuple[str, ...], str]], images: list[torch.Tensor],
                      compare) -> dict[str, Any]:
    """Run the stage signatures one after another (each fed the previous ones' outputs, by tensor name) and compare
    the result with the ``restore`` runner on the same images: {"images", "psnr_db_min", "max_abs_error"}."""
    rows = []
    for image in images:
        tensors = {"lq_image": image}
        for key, (_, ins, out) in sigs.items():
            if key != RESTORE:
                tensors[out] = torch.from_numpy(np.asarray(runners[key](tuple(tensors[n] for n in ins)), np.float32))
        rows.append(compare(tensors[sigs[RESTORE][2]].numpy(), runners[RESTORE]((image,)), True))
    return {"images": len(rows), "psnr_db_min": min(min(r["psnr_db"], 150.0) for r in rows),
            "max_abs_error": max(r["max_abs_error"] for r in rows),
            "note": "stage signatures chained (vae_encoder, embedder -> unet -> vae_decoder) vs the restore signature"}


class TfliteBackend:
    """``--target tflite`` (toolchain/export/backend.py: ExportBackend)."""

    target = "tflite"
    suffix = ".tflite"

    def export(self, model: torch.nn.Module, out: Path, options: ExportOptions) -> dict[str, Any]:
        return export_tflite(model, out, options)

    def validate(self, path: Path, model: torch.nn.Module, options: ExportOptions, inputs: Inputs) -> dict[str, Any]:
        return validate_tflite(path, model, options.part, inputs)
