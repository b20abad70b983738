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


SPATIAL_MULTIPLE_KEY = "quantface_spatial_multiple"


def parse_shapes(items: list[str] | None) -> dict[str, list[int]]:
    """``["lq_image=1x3x64x64", "1x4x8x8"]`` → {"lq_image": [...], "#1": [...]} (unnamed = by position).

    Raises ConfigError for malformed items or non-positive sizes."""
    from toolchain.errors import ConfigError

    shapes: dict[str, list[int]] = {}
    for k, item in enumerate(items or []):
        name, sep, dims = item.rpartition("=")
        try:
            shape = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            shape = []
        if not shape or any(d < 1 for d in shape):
            raise ConfigError(f"--shape expects [NAME=]N x C x H x W with positive sizes, e.g. 1x3x64x64; got '{item}'")
        shapes[name if sep else f"#{k}"] = shape
    return shapes


def concrete_shapes(inputs: list[tuple[str, list]], shapes: dict[str, list[int]], multiple: int | None, model: str) -> list[list[int]]:
    """Resolve every input's shape: fixed dims as stored, dynamic ones (names, None, -1) from ``shapes``.

    Raises ConfigError with one line when a dynamic input has no --shape, a --shape contradicts a fixed
    dimension, or a spatial size is not a multiple of the model's recorded ``multiple``."""
    from toolchain.errors import ConfigError

    out = []
    for k, (name, shape) in enumerate(inputs):
        dynamic = [not isinstance(d, (int, np.integer)) or d < 1 for d in shape]
        given = shapes.get(name, shapes.get(f"#{k}"))
        hint = f" (height and width multiples of {multiple})" if multiple else ""
        if given is None:
            if any(dynamic):
                dims = "x".join(str(d) if not dyn else str(d or "?") for d, dyn in zip(shape, dynamic))
                raise ConfigError(f"{model}: input '{name}' has dynamic dimensions {dims}; give concrete ones with "
                                  f"--shape {name}=1x{'x'.join(str(d) if not dyn else 'N' for d, dyn in list(zip(shape, dynamic))[1:])}{hint}")
            out.append([int(d) for d in shape])
            continue
        if len(given) != len(shape) or any(not dyn and int(d) != g for d, g, dyn in zip(shape, given, dynamic)):
            fixed = "" if any(dynamic) else " (fixed at export: export with --dynamic for other sizes)"
            raise ConfigError(f"{model}: --shape {'x'.join(map(str, given))} does not fit input '{name}' of shape {list(shape)}{fixed}")
        if multiple and len(given) == 4 and (given[2] % multiple or given[3] % multiple):
            raise ConfigError(f"{model}: --shape {'x'.join(map(str, given))}: height and width must be multiples of {multiple} "
                              f"for this dynamic-shape export (e.g. {given[2] // multiple * multiple or multiple}x"
                              f"{given[3] // multiple * multiple or multiple})")
        out.append(list(given))
    return out


def _random_inputs(shapes: list[tuple[list[int], Any]]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(-1, 1, size=[int(d) for d in shape]).astype(dtype) for shape, dtype in shapes]


def host_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}


def profile_tflite(path: str | os.PathLike, threads: int = 4, runs: int = 20, warmup: int = 3, xnnpack: bool = True,
                   shapes: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Time the LiteRT interpreter on random inputs (float32 in [-1, 1]), every signature of the file: a one-file
    pipeline (toolchain/export/pipeline.py) gets ``signatures`` = {name: {"inputs": {input: shape}, "inference_ms": {...}}},
    ``restore`` first; the top-level ``inference_ms`` is the default signature's (``restore``, or the only one).

    A TFLite export has its input shapes baked in (LiteRT cannot resize these graphs, toolchain/export/litert/runtime.py:
    check_shape), so ``shapes`` (see ``parse_shapes``; a name applies to that input in every signature, ``#k`` to the
    default signature's k-th input) may only repeat them. Returns the report dict (times in ms). Raises InputError
    for a file LiteRT cannot load or a shape other than the baked one, ConfigError for a --shape naming no input."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from toolchain.export.litert.runtime import check_shape, default_signature, input_order
    from toolchain.errors import ConfigError, InputError

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    t0 = time.perf_counter()
    try:
        it = Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver)
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"{path} is not a TFLite model LiteRT can load ({str(exc).strip().splitlines()[0][:200]})") from None
    signatures = it.get_signature_list()
    default = default_signature(signatures) or next(iter(signatures), None)
    if default is None:
        raise InputError(f"{path} has no signature to run (re-export it with `toolchain export --target tflite`)")
    shapes = dict(shapes or {})
    runners, feeds = {}, {}
    for key in signatures:
        runner = it.get_signature_runner(key)
        details = runner.get_input_details()
        order = input_order(key, list(details))
        arrays = {}
        for k, name in enumerate(order):
            baked = [int(d) for d in details[name]["shape"]]
            given = shapes.get(name, shapes.get(f"#{k}") if key == default else None)
            if given is not None:
                check_shape(Path(path).name, key, name, baked, given)
            arrays[name] = _random_inputs([(baked, details[name]["dtype"])])[0]
        runners[key], feeds[key] = runner, arrays
    known = {n for f in feeds.values() for n in f} | {f"#{k}" for k in range(len(feeds[default]))}
    unknown = sorted(set(shapes) - known)
    if unknown:
        names = sorted({n for f in feeds.values() for n in f})
        raise ConfigError(f"{path}: --shape names no input of the model: {', '.join(unknown)} (its inputs: {', '.join(names)})")
    for key, runner in runners.items():  # tensors allocated before the timed runs
        runner(**feeds[key])
    init_ms = (time.perf_counter() - t0) * 1000
    per_sig = {key: {"inputs": {n: list(a.shape) for n, a in feeds[key].items()},
                     "inference_ms": _timed(lambda r=runner, f=feeds[key]: r(**f), warmup, runs)} for key, runner in runners.items()}
    report = {"runtime": "litert-interpreter", "delegate": "xnnpack" if xnnpack else "none (builtin kernels)", "threads": threads,
              "init_ms": init_ms, "inference_ms": per_sig[default]["inference_ms"], "signature": default,
              "model_bytes": Path(path).stat().st_size,
              "per_op": None, "per_op_note": "the LiteRT Python interpreter has no per-op profiler; use --adb with benchmark_model, "
                                             "or profile the ONNX export for per-layer times"}
    if len(per_sig) > 1:
        report["signatures"] = per_sig
    return report


def _layer_of(node_name: str) -> str | None:
    """'/model/unet/down_blocks.0/resnets.0/conv1/Conv' → 'unet.down_blocks.0.resnets.0.conv1'."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return None
    while parts and parts[0] in ("inner", "model"):  # "inner": the pad-to-multiple wrapper of dynamic exports
        parts = parts[1:]
    return ".".join(parts[:-1]) or None


def profile_onnx(path: str | os.PathLike, threads: int = 4, runs: int = 20, warmup: int = 3, per_op: bool = True,
                 shapes: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Time ONNX Runtime (CPU) on random inputs, with per-node times from its profiler.

    ``shapes`` fixes dynamic inputs (see ``parse_shapes``); a dynamic-shape export's spatial multiple
    (metadata ``quantface_spatial_multiple``) is checked. Raises InputError for a file ORT cannot load."""
    import onnxruntime as ort

    from toolchain.errors import InputError

    from toolchain.export.qdq.runtime import ort_session

    t0 = time.perf_counter()
    try:
        sess = ort_session(path, threads)  # a default session: what users run
    except Exception as exc:  # ORT raises its own pybind classes (InvalidProtobuf, Fail, …) for unreadable models
        raise InputError(f"{path} is not an ONNX model ONNX Runtime can load ({str(exc).strip().splitlines()[0][:200]})") from None
    init_ms = (time.perf_counter() - t0) * 1000
    type_map = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    meta = sess.get_modelmeta().custom_metadata_map
    multiple = meta.get(SPATIAL_MULTIPLE_KEY) if meta.get("quantface_pads_to_multiple") != "true" else None  # padded graphs take any size
    resolved = concrete_shapes([(i.name, list(i.shape)) for i in sess.get_inputs()], shapes or {}, int(multiple) if multiple else None, str(path))
    feeds = {i.name: x for i, x in zip(sess.get_inputs(), _random_inputs([(shape, type_map.get(i.type, np.float32))
                                                                          for i, shape in zip(sess.get_inputs(), resolved)]))}
    res = _timed(lambda: sess.run(None, feeds), warmup, runs)
    report: dict[str, Any] = {"runtime": f"onnxruntime {ort.__version__} CPU", "threads": threads, "init_ms": init_ms, "inference_ms": res,
                              "model_bytes": Path(path).stat().st_size + (Path(str(path) + ".data").stat().st_size if Path(str(path) + ".data").exists() else 0)}
    from toolchain.export.pipeline import RESTORE, onnx_stage, onnx_stages

    stages = onnx_stages(sess)
    if stages:  # a one-file pipeline: each stage cut out of it and timed on its own (what ORT Mobile / an NPU runs per stage)
        report["signatures"] = {RESTORE: {"inputs": {n: list(x.shape) for n, x in feeds.items()}, "inference_ms": res}}
        for key, spec in stages.items():
            if key == RESTORE:
                continue
            stage = ort_session(onnx_stage(str(path), key).SerializeToString(), threads)
            ins = [(i.name, list(i.shape)) for i in stage.get_inputs()]
            arrays = {n: x for (n, _), x in zip(ins, _random_inputs([(shape, np.float32) for _, shape in ins]))}
            report["signatures"][key] = {"inputs": {n: list(x.shape) for n, x in arrays.items()},
                                         "inference_ms": _timed(lambda st=stage, a=arrays: st.run(None, a), warmup, runs)}
    if per_op:
        ps = ort_session(path, threads, profile_prefix=str(Path(path).with_suffix("")) + "_ort_profile")
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
