"""Parser for LiteRT ``benchmark_model`` / ``benchmark_litert_model`` output (stdout or logcat).

Tolerates the variants seen in real logs (ANCHORS.md §3.2): ``INFO:`` and Android logcat prefixes,
scientific notation, stat lines with or without percentiles, the old "Average inference timings"
and "Peak memory footprint" lines, op-profiling tables with or without the ``[start]`` column
(columns are read from the header row, never by position), multi-section tables, the CompiledModel
tool's "BENCHMARK RESULTS" block, and the delegation lines that reveal CPU fallback.
"""

from __future__ import annotations

import re
from typing import Any

_LOGCAT = re.compile(r"^\d\d-\d\d \d\d:\d\d:\d\d\.\d+\s+\d+\s+\d+\s+[VDIWEF]\s+[^:]*:\s?")
_NUM = r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"


def _strip(line: str) -> str:
    line = _LOGCAT.sub("", line.rstrip("\n"))
    for prefix in ("INFO: ", "WARNING: ", "ERROR: "):
        if line.startswith(prefix):
            line = line[len(prefix):]
    return line


def _stats(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(rf"(\w+)=({_NUM})", line)}


def _table_rows(lines: list[str], start: int) -> tuple[list[dict[str, Any]], int]:
    """Rows of a TAB-separated table whose header row is at ``start``; returns (rows, next index)."""
    header = [h.strip().strip("[]").strip().lower() for h in lines[start].split("\t") if h.strip()]
    rows = []
    i = start + 1
    while i < len(lines):
        raw = lines[i]
        if not raw.strip() or raw.lstrip().startswith("="):
            break
        cells = [c.strip() for c in raw.split("\t") if c.strip()]
        if len(cells) < len(header):
            break
        row: dict[str, Any] = {}
        for key, cell in zip(header, cells):
            cell = cell.rstrip("%")
            try:
                row[key] = float(cell)
            except ValueError:
                row[key] = cell
        rows.append(row)
        i += 1
    return rows, i


_ERROR_LINE = re.compile(r"^(?:ERROR: |E/|\d\d-\d\d \d\d:\d\d:\d\d\.\d+\s+\d+\s+\d+\s+[EF]\s)")
_FAILURE = re.compile(r"(Benchmarking failed|Failed to apply .*delegate|Failed to (?:allocate|invoke|initialize|create)|"
                      r"Error in applying the default TensorFlow Lite delegate|Aborted)", re.I)
_GPU_SPLIT = re.compile(r"(\d+) operations will run on the (\w+), and the remaining (\d+) operations? will run on the CPU")


def parse_benchmark_output(text: str) -> dict[str, Any]:
    """Parse benchmark_model output into a report (times in ms; see ``_normalise``).

    Besides timings it records ``errors`` (lines the tool printed as errors or failures),
    ``failed`` (the run or its delegate failed: "Benchmarking failed.", "Failed to apply … delegate")
    and ``fallback`` (partial delegation, from any of the lines LiteRT prints for it)."""
    raw_lines = text.splitlines()
    lines = [_strip(l) for l in raw_lines]
    out: dict[str, Any] = {"runs": {}, "delegation": [], "fallback": False, "ops": [], "node_types": [], "errors": [], "failed": False}
    section = None
    i = 0
    while i < len(lines):
        line = lines[i]
        s = line.strip()
        if _ERROR_LINE.match(raw_lines[i].lstrip()) or _FAILURE.search(s):
            out["errors"].append(s)
            out["failed"] |= bool(_FAILURE.search(s))
        if m := _GPU_SPLIT.search(s):
            delegated, rest = int(m.group(1)), int(m.group(3))
            out["delegation"].append({"delegated_nodes": delegated, "total_nodes": delegated + rest, "delegate": m.group(2),
                                      "partitions": None})
            out["fallback"] |= rest > 0
            out.setdefault("delegate_messages", []).append(s)
        elif m := re.match(r"Num threads: \[(\d+)\]", s):
            out["threads"] = int(m.group(1))
        elif m := re.match(r"Graph: \[(.*)\]", s):
            out["graph"] = m.group(1)
        elif m := re.match(rf"The input model file size \(MB\): ({_NUM})", s):
            out["model_size_mb"] = float(m.group(1))
        elif m := re.match(rf"Initialized session in ({_NUM})\s*ms", s):
            out["init_ms"] = float(m.group(1))
        elif s.startswith("Running benchmark for at least"):
            section = "warmup" if "warmup" not in out["runs"] else "regular"
        elif s.startswith("count="):
            stats = _stats(s)
            if section in ("warmup", "regular"):
                out["runs"][section] = stats
            elif stats.get("count", 0) > 1:  # a stat line without its "Running benchmark" header (logcat excerpts)
                out["runs"]["regular"] = stats
        elif s.startswith("Timings (microseconds):"):
            out["runs"].setdefault("regular_profiled", _stats(s))
        elif m := re.match(rf"Inference timings in us: Init: ({_NUM}), First inference: ({_NUM}), Warmup \(avg\): ({_NUM}), Inference \(avg\): ({_NUM})", s):
            out.update({"init_us": float(m.group(1)), "first_inference_us": float(m.group(2)), "warmup_avg_us": float(m.group(3)),
                        "inference_avg_us": float(m.group(4))})
        elif m := re.match(rf"Average inference timings in us: Warmup: ({_NUM}), Init: ({_NUM}), Inference: ({_NUM})", s):
            out.update({"warmup_avg_us": float(m.group(1)), "init_us": float(m.group(2)), "inference_avg_us": float(m.group(3))})
        elif m := re.match(rf"(?:Memory footprint delta from the start of the tool|Peak memory footprint) \(MB\): init=({_NUM}) overall=({_NUM})", s):
            out["memory_mb"] = {"init": float(m.group(1)), "overall": float(m.group(2))}
        elif m := re.match(rf"Overall peak memory footprint \(MB\) via periodic monitoring: ({_NUM})", s):
            out.setdefault("memory_mb", {})["peak"] = float(m.group(1))
        elif m := re.match(r"Replacing (\d+) out of (\d+) node\(s\) with delegate \(([^)]*)\) node, yielding (\d+) partitions", s):
            out["delegation"].append({"delegated_nodes": int(m.group(1)), "total_nodes": int(m.group(2)), "delegate": m.group(3),
                                      "partitions": int(m.group(4))})
            out["fallback"] |= int(m.group(1)) < int(m.group(2))
        elif "will be partially executed by the delegate" in s or "will not be executed by the delegate" in s or "Disallowed CPU fallback" in s:
            out["fallback"] = True
            out.setdefault("delegate_messages", []).append(s)
        elif "will be completely executed by the delegate" in s:
            out.setdefault("delegate_messages", []).append(s)
        elif s.startswith("Operator-wise Profiling Info for Regular Benchmark Runs"):
            section = "ops"
        elif s.startswith("Profiling Info for Benchmark Initialization"):
            section = "init_ops"
        elif s.startswith("=" * 10) and "Run Order" in s and section == "ops":
            rows, i = _table_rows(lines, i + 1)
            out["ops"] = rows
            continue
        elif s.startswith("=" * 10) and "Summary by node type" in s:
            rows, i = _table_rows(lines, i + 1)
            out["node_types"] = rows
            continue
        elif m := re.match(rf"Number of nodes executed: (\d+)", s):
            out["nodes_executed"] = int(m.group(1))
        elif s.startswith("========== BENCHMARK RESULTS"):
            section = "litert"
        elif section == "litert" and (m := re.match(rf"([A-Za-z ()]+?):\s+({_NUM})", s)):
            key = re.sub(r"[^a-z]+", "_", m.group(1).lower()).strip("_")
            out.setdefault("litert", {})[key] = float(m.group(2))
        i += 1
    return _normalise(out)


def _normalise(p: dict[str, Any]) -> dict[str, Any]:
    """Common fields in milliseconds, whichever tool printed them."""
    res: dict[str, Any] = {"tool_fields": p}
    reg = p["runs"].get("regular") or p["runs"].get("regular_profiled")
    if reg:
        res["inference_ms"] = {k: reg[k] / 1000.0 for k in ("avg", "min", "max", "std", "median", "p5", "p95", "first") if k in reg}
        res["runs"] = int(reg.get("count", 0))
    elif "inference_avg_us" in p:
        res["inference_ms"] = {"avg": p["inference_avg_us"] / 1000.0}
    if "litert" in p:
        lt = p["litert"]
        res["inference_ms"] = {"avg": lt.get("inference_avg"), "min": lt.get("inference_min"), "max": lt.get("inference_max"),
                               "std": lt.get("inference_std")}
        res["init_ms"] = lt.get("model_initialization")
        res["memory_mb"] = {"init": lt.get("init_footprint"), "overall": lt.get("overall_footprint"), "peak": lt.get("peak_memory")}
    if "init_us" in p:
        res["init_ms"] = p["init_us"] / 1000.0
    elif "init_ms" in p:
        res.setdefault("init_ms", p["init_ms"])
    if "first_inference_us" in p:
        res["first_inference_ms"] = p["first_inference_us"] / 1000.0
    if "warmup_avg_us" in p:
        res["warmup_avg_ms"] = p["warmup_avg_us"] / 1000.0
    if "memory_mb" in p:
        res["memory_mb"] = p["memory_mb"]
    for k in ("threads", "graph", "model_size_mb", "delegation", "fallback", "nodes_executed", "errors", "failed"):
        if k in p:
            res[k] = p[k]
    res["ops"] = [{"type": r.get("node type"), "name": r.get("name"), "avg_ms": r.get("avg ms"), "percent": r.get("%"),
                   "first_ms": r.get("first"), "start_ms": r.get("start")} for r in p["ops"]]
    res["node_types"] = [{"type": r.get("node type"), "count": r.get("count"), "avg_ms": r.get("avg ms"), "percent": r.get("avg %")}
                         for r in p["node_types"]]
    return res
