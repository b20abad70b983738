"""Phone profiling over adb: push the model, run LiteRT's ``benchmark_model`` with op profiling, parse.

The benchmark binary is not shipped in any wheel: push it once yourself (``adb push benchmark_model
/data/local/tmp/``) or pass ``--benchmark-binary`` with its path on the device.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from toolchain.errors import ToolchainError
from toolchain.profile.benchmark_parser import parse_benchmark_output

DELEGATE_FLAGS = {"cpu": [], "xnnpack": ["--use_xnnpack=true"], "gpu": ["--use_gpu=true"], "nnapi": ["--use_nnapi=true"]}


class AdbError(ToolchainError):
    pass


def _adb(adb: str, *args: str, timeout: float = 900.0) -> str:
    try:
        res = subprocess.run([adb, *args], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise AdbError(f"adb not found ('{adb}'): install Android platform-tools or pass --adb-path") from None
    except subprocess.TimeoutExpired:
        raise AdbError(f"adb {' '.join(args[:2])} timed out after {timeout:.0f} s") from None
    if res.returncode != 0:
        raise AdbError(f"adb {' '.join(args[:2])} failed: {(res.stderr or res.stdout).strip().splitlines()[-1] if (res.stderr or res.stdout).strip() else res.returncode}")
    return res.stdout


def benchmark_command(device_model: str, binary: str, threads: int, runs: int, warmup: int, delegate: str) -> list[str]:
    if delegate not in DELEGATE_FLAGS:
        raise AdbError(f"unknown delegate '{delegate}' (choose from {', '.join(DELEGATE_FLAGS)})")
    return [binary, f"--graph={device_model}", f"--num_threads={threads}", f"--num_runs={runs}", f"--warmup_runs={warmup}",
            "--enable_op_profiling=true", "--report_peak_memory_footprint=true", *DELEGATE_FLAGS[delegate]]


def profile_over_adb(model: Path, adb: str = "adb", device_dir: str = "/data/local/tmp", binary: str | None = None,
                     threads: int = 4, runs: int = 50, warmup: int = 5, delegate: str = "xnnpack", serial: str | None = None) -> dict[str, Any]:
    adb = shutil.which(adb) or adb
    prefix = ["-s", serial] if serial else []
    devices = [l.split()[0] for l in _adb(adb, *prefix, "devices").splitlines()[1:] if l.strip().endswith("device")]
    if not devices:
        raise AdbError("no Android device is connected (adb devices lists none)")
    binary = binary or f"{device_dir}/benchmark_model"
    if not _adb(adb, *prefix, "shell", f"ls {binary} 2>/dev/null || true").strip():
        raise AdbError(f"{binary} is not on the device; push LiteRT's benchmark_model there first (adb push benchmark_model {device_dir}/)")
    remote = f"{device_dir}/{model.name}"
    _adb(adb, *prefix, "push", str(model), remote)
    model_info = _adb(adb, *prefix, "shell", "getprop ro.product.model").strip()
    soc = _adb(adb, *prefix, "shell", "getprop ro.soc.model").strip()
    cmd = benchmark_command(remote, binary, threads, runs, warmup, delegate)
    text = _adb(adb, *prefix, "shell", " ".join(cmd))
    parsed = parse_benchmark_output(text)
    parsed.update({"runtime": "benchmark_model (adb)", "device": model_info or devices[0], "soc": soc or None, "delegate": delegate,
                   "threads": threads, "command": " ".join(cmd), "raw_output_tail": text[-4000:]})
    return parsed


_DEMO_LINE = re.compile(r"QuantFaceDemo\s*:?\s*timing\s+(.*)$")


def parse_demo_logcat(text: str) -> dict[str, Any]:
    """Timings the Android demo writes to logcat: ``QuantFaceDemo: timing stage=… run=… ms=… delegate=… threads=…``."""
    stages: dict[str, list[float]] = {}
    meta: dict[str, str] = {}
    for line in text.splitlines():
        m = _DEMO_LINE.search(line)
        if not m:
            continue
        fields = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)
        if "stage" in fields and "ms" in fields:
            stages.setdefault(fields["stage"], []).append(float(fields["ms"]))
        meta.update({k: v for k, v in fields.items() if k in ("delegate", "threads", "model", "device")})
    import statistics

    return {"runtime": "android demo (logcat)", **meta,
            "stages_ms": {s: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": len(v)} for s, v in stages.items()}}
