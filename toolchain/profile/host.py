"""Host latency: the LiteRT interpreter (XNNPACK on/off, threads) and ONNX Runtime (with per-node times)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _timed(run: Callable[[], Any], warmup: int, runs: int) -> dict[str, float]:
    t0 = time.perf_counter()
    run()
    first = (time.perf_counter() - t0) * 1000
    for _ in range(max(0, warmup - 1)):
        run()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1000)
    return {"first": first, "median": statistics.median(times), "min": min(times), "max": max(times), "avg": statistics.fmean(times),
            "std": statistics.pstdev(times), "runs": runs, "warmup": warmup}


def _random_inputs(shapes: list[tuple[list[int], Any]]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(-1, 1, size=[int(d) if d and d > 0 else 1 for d in shape]).astype(dtype) for shape, dtype in shapes]


def host_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}


def profile_tflite(path: str | os.PathLike, threads: int = 4, runs: int = 20, warmup: int = 3, xnnpack: bool = True) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    t0 = time.perf_counter()
    it = Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    init_ms = (time.perf_counter() - t0) * 1000
    details = it.get_input_details()
    for d, x in zip(details, _random_inputs([(d["shape"], d["dtype"]) for d in details])):
        it.set_tensor(d["index"], x)
    res = _timed(it.invoke, warmup, runs)
    return {"runtime": "litert-interpreter", "delegate": "xnnpack" if xnnpack else "none (builtin kernels)", "threads": threads,
            "init_ms": init_ms, "inference_ms": res, "model_bytes": Path(path).stat().st_size,
            "per_op": None, "per_op_note": "the LiteRT Python interpreter has no per-op profiler; use --adb with benchmark_model, "
                                           "or profile the ONNX export for per-layer times"}


def _layer_of(node_name: str) -> str | None:
    """'/model/unet/down_blocks.0/resnets.0/conv1/Conv' → 'unet.down_blocks.0.resnets.0.conv1'."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return None
    if parts[0] == "model":
        parts = parts[1:]
    return ".".join(parts[:-1]) or None


def profile_onnx(path: str | os.PathLike, threads: int = 4, runs: int = 20, warmup: int = 3, per_op: bool = True) -> dict[str, Any]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])  # a default session: what users run
    init_ms = (time.perf_counter() - t0) * 1000
    type_map = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    feeds = {i.name: x for i, x in zip(sess.get_inputs(), _random_inputs([(i.shape, type_map.get(i.type, np.float32)) for i in sess.get_inputs()]))}
    res = _timed(lambda: sess.run(None, feeds), warmup, runs)
    report: dict[str, Any] = {"runtime": f"onnxruntime {ort.__version__} CPU", "threads": threads, "init_ms": init_ms, "inference_ms": res,
                              "model_bytes": Path(path).stat().st_size + (Path(str(path) + ".data").stat().st_size if Path(str(path) + ".data").exists() else 0)}
    if per_op:
        so_p = ort.SessionOptions()
        so_p.intra_op_num_threads = threads
        so_p.enable_profiling = True
        so_p.profile_file_prefix = str(Path(path).with_suffix("")) + "_ort_profile"
        ps = ort.InferenceSession(str(path), so_p, providers=["CPUExecutionProvider"])
        for _ in range(max(3, min(runs, 5))):
            ps.run(None, feeds)
        trace = Path(ps.end_profiling())
        events = json.loads(trace.read_text())
        trace.unlink(missing_ok=True)
        per_layer: dict[str, float] = {}
        per_type: dict[str, float] = {}
        n_runs = max(3, min(runs, 5))
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                continue
            name = e["name"][: -len("_kernel_time")]
            ms = e["dur"] / 1000.0 / n_runs
            op = e.get("args", {}).get("op_name", "?")
            per_type[op] = per_type.get(op, 0.0) + ms
            layer = _layer_of(name)
            if layer:
                per_layer[layer] = per_layer.get(layer, 0.0) + ms
        report["per_op_type_ms"] = dict(sorted(per_type.items(), key=lambda kv: -kv[1]))
        report["per_layer_ms"] = per_layer
    return report
