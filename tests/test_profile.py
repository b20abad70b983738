"""Profiling: benchmark_model output parsing (real and documented formats), adb flow, host runs."""

import json
import os
import stat
from pathlib import Path

import pytest

from toolchain.cli import main
from toolchain.profile.adb import benchmark_command, parse_demo_logcat
from toolchain.profile.benchmark_parser import parse_benchmark_output

DATA = Path(__file__).parent / "data"


def test_parses_real_op_profiling_output():
    r = parse_benchmark_output((DATA / "benchmark_model_mobilenet_op_profiling.txt").read_text())
    assert r["inference_ms"]["avg"] == pytest.approx(2950.34)
    assert r["inference_ms"]["min"] == pytest.approx(2727.568) and r["runs"] == 50
    assert r["init_ms"] == pytest.approx(17.187) and r["first_inference_ms"] == pytest.approx(3512.391)
    assert r["memory_mb"] == {"init": 4.21094, "overall": 46.0859}
    assert r["threads"] == 4 and r["model_size_mb"] == pytest.approx(16.9008) and r["nodes_executed"] == 31
    assert [o["type"] for o in r["ops"]] == ["CONV_2D", "DEPTHWISE_CONV_2D"]  # run order only, not "top by time"
    assert r["ops"][0]["avg_ms"] == pytest.approx(60.957) and r["ops"][0]["start_ms"] == pytest.approx(0.066)
    assert r["node_types"][0] == {"type": "CONV_2D", "count": 15, "avg_ms": 2651.853, "percent": 89.897}
    assert r["fallback"] is False


def test_parses_logcat_without_start_column_and_flags_partial_delegation():
    r = parse_benchmark_output((DATA / "benchmark_model_logcat_no_start_column.txt").read_text())
    assert r["inference_ms"]["median"] == pytest.approx(141.253) and r["inference_ms"]["p95"] == pytest.approx(187.533)
    assert r["memory_mb"]["overall"] == pytest.approx(138.809)
    assert r["delegation"][0] == {"delegated_nodes": 120, "total_nodes": 131, "delegate": "TfLiteXNNPackDelegate", "partitions": 5}
    assert r["fallback"] is True
    assert r["ops"][1]["name"] == "[model.unet.down_blocks.0.resnets.0.conv1;2]:5" and r["ops"][1]["start_ms"] is None


def test_parses_compiled_model_tool_and_old_format():
    r = parse_benchmark_output((DATA / "benchmark_litert_model_gpu.txt").read_text())
    assert r["inference_ms"] == {"avg": 41.75, "min": 40.02, "max": 48.91, "std": 1.73}
    assert r["memory_mb"]["peak"] == 260.0 and r["init_ms"] == pytest.approx(512.34) and r["fallback"] is True
    old = parse_benchmark_output((DATA / "benchmark_model_old_average.txt").read_text())
    assert old["inference_ms"]["avg"] == pytest.approx(79.7609) and old["fallback"] is True


def test_demo_logcat_timings():
    text = "\n".join(f"11-23 10:00:0{i}.000  123  456 I QuantFaceDemo: timing stage=inference run={i} ms={10 + i} delegate=GPU threads=4"
                     for i in range(5)) + "\n11-23 10:00:09.000  123  456 I QuantFaceDemo: timing stage=preprocess run=0 ms=2.5 delegate=GPU threads=4"
    r = parse_demo_logcat(text)
    assert r["stages_ms"]["inference"] == {"median": 12.0, "min": 10.0, "max": 14.0, "runs": 5}
    assert r["delegate"] == "GPU" and r["stages_ms"]["preprocess"]["runs"] == 1


def test_adb_flow_with_a_fake_device(tmp_path, capsys):
    """A stand-in `adb` (a shell script) answers like a device that has benchmark_model."""
    fake = tmp_path / "adb"
    log = tmp_path / "calls.txt"
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {log}
case "$*" in
  devices) printf 'List of devices attached\\nemulator-5554\\tdevice\\n' ;;
  *"getprop ro.product.model"*) echo Pixel 8a ;;
  *"getprop ro.soc.model"*) echo Tensor G3 ;;
  *"ls "*) echo /data/local/tmp/benchmark_model ;;
  *benchmark_model*--graph*) cat {DATA / 'benchmark_model_mobilenet_op_profiling.txt'} ;;
esac
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    model = tmp_path / "m.tflite"
    model.write_bytes(b"TFL3")
    out = tmp_path / "prof"
    assert main(["profile", str(model), "--adb", "--adb-path", str(fake), "--delegate", "gpu", "--threads", "2", "--out", str(out)]) == 0
    report = json.loads((out / "profile.json").read_text())
    assert report["device"] == "Pixel 8a" and report["soc"] == "Tensor G3" and report["inference_ms"]["avg"] == pytest.approx(2950.34)
    calls = log.read_text()
    assert "push" in calls and "--use_gpu=true" in calls and "--enable_op_profiling=true" in calls and "--num_threads=2" in calls
    assert (out / "per_layer_latency.png").is_file()


def test_adb_without_device_is_a_clear_error(tmp_path, capsys):
    fake = tmp_path / "adb"
    fake.write_text("#!/bin/sh\nprintf 'List of devices attached\\n'\n")
    fake.chmod(0o755)
    model = tmp_path / "m.tflite"
    model.write_bytes(b"TFL3")
    assert main(["profile", str(model), "--adb", "--adb-path", str(fake)]) == 2
    assert "no Android device" in capsys.readouterr().err
    with pytest.raises(Exception, match="unknown delegate"):
        benchmark_command("/m", "/b", 1, 1, 1, "tpu")


def test_host_profiles_onnx_and_tflite(tiny_model_path, tmp_path):
    from toolchain.export.onnx_backend import export_onnx
    from toolchain.models import load_model
    from toolchain.profile.host import profile_onnx

    rep = export_onnx(load_model(tiny_model_path), tmp_path / "fp.onnx")
    prof = profile_onnx(rep["path"], threads=1, runs=3, warmup=1)
    assert prof["inference_ms"]["median"] > 0 and prof["per_layer_ms"]
    assert any(k.startswith("unet.") for k in prof["per_layer_ms"])
    assert os.path.exists(rep["path"])
