"""ONNX Runtime on the exported graphs: the session a user gets, and what ORT's QDQ transformer fuses."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

FUSED_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul")


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


def ort_session(path: str | os.PathLike | bytes, threads: int | None = None, optimize: bool = True,
                profile_prefix: str | None = None):
    """A *default* ONNX Runtime CPU session — what a user gets from ``InferenceSession(path)`` —
    or, with ``optimize=False``, one with every graph optimisation off (the ONNX reference
    semantics of the QDQ graph). ``threads`` sets intra-op threads (None: ORT's default);
    ``profile_prefix`` turns on ORT's per-node profiler, writing ``PREFIX_*.json`` (``end_profiling()``).
    The one place the toolchain builds ORT sessions for exported graphs (validation, parity, profile).

    The exported graphs need no session options to be exact: activations and 5–8-bit weights are
    unsigned (u8·u8 kernels, no saturation on AVX2), narrowing clips act on integers, biases are
    separate Adds (toolchain/export/ops.py, toolchain/export/prepare.py).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=["CPUExecutionProvider"])
