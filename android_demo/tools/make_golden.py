"""Write the golden files the Java core's JUnit tests check against (run by hand; outputs committed).

    .venv/bin/python android_demo/tools/make_golden.py

* ``preprocess.json``: images of awkward sizes → the exact model input the Python pipeline
  (toolchain/pipeline/restore.py) builds, and a model output → the restored image it returns.
* ``model.precision.json`` / ``mp_table.json``: a real sidecar and table from
  ``toolchain export --target tflite`` on the tiny preset with a hand-mixed 3–8-bit table.
* ``logcat_demo.txt``: timing lines in the app's format, also parsed by the Python profiler tests.

``tests/test_android_golden.py`` regenerates the preprocessing cases and fails if the committed
file drifted from the Python pipeline.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "android_demo" / "core" / "src" / "test" / "resources" / "golden"
CASES = [  # (height, width, model size): shrink + reflect pad, widen + replicate pad, enlarge without pad, identity
    (37, 23, 24), (10, 40, 24), (12, 12, 24), (20, 20, 20), (5, 3, 16)]


def preprocess_cases() -> dict:
    sys.path.insert(0, str(REPO))
    from toolchain.io.images import LoadedImage
    from toolchain.pipeline.restore import from_model_output, to_model_input

    rng = np.random.default_rng(0)
    cases = []
    for h, w, size in CASES:
        rgb = rng.random((h, w, 3), dtype=np.float32)
        x, place = to_model_input(LoadedImage(rgb, None, "RGB"), size)
        out = torch.from_numpy(rng.uniform(-1.1, 1.1, (1, 3, size, size)).astype(np.float32))
        restored = from_model_output(out, place, (h, w))
        cases.append({"height": h, "width": w, "size": size, "rgb_hwc": [round(float(v), 7) for v in rgb.reshape(-1)],
                      "model_input_nchw": [round(float(v), 7) for v in x.reshape(-1)],
                      "placement": [place.top, place.left, place.height, place.width],
                      "model_output_nchw": [round(float(v), 7) for v in out.reshape(-1)],
                      "restored_hwc": [round(float(v), 7) for v in restored.reshape(-1)]})
    return {"source": "toolchain/pipeline/restore.py", "cases": cases}


def precision_files(dest: Path) -> None:
    from toolchain.cli import main

    work = Path(tempfile.mkdtemp(prefix="golden-"))
    try:
        from toolchain.calibration import BUNDLED_FACES
        from toolchain.calibration.dataset import build_calibration_set
        from toolchain.alloc.table import save_table
        from toolchain.models import build_model, preset, save_model
        from toolchain.quant.checkpoint import read_checkpoint_meta

        calib = build_calibration_set([BUNDLED_FACES], work / "calib", n=4, size=32, seed=0, progress=False)
        save_model(build_model(preset("tiny"), seed=0), work / "tiny.safetensors")
        common = ["--model", str(work / "tiny.safetensors"), "--bits", "w4a4", "--calib", str(calib), "--device", "cpu"]
        assert main(["quantize", *common, "--out", str(work / "base")]) == 0
        names = [n for n, d in read_checkpoint_meta(work / "base")["layers"].items() if d["a_bits"]]
        layers = [{"name": n, "a_bits": [3, 4, 5, 6, 8][i % 5], "w_bits": 4, "cost": 1.0} for i, n in enumerate(names)]
        save_table({"kind": "quantface-mp-table", "version": 1, "w_bits": 4, "cost_model": "act_bits", "budget": 1e9, "cost": float(len(layers)),
                    "average_a_bits": float(np.mean([l["a_bits"] for l in layers])), "layers": layers}, work / "mp_table.json")
        assert main(["quantize", *common, "--mp-table", str(work / "mp_table.json"), "--out", str(work / "mp")]) == 0
        assert main(["export", str(work / "mp"), "--target", "tflite", "--out", str(work / "model.tflite"), "--calib", str(calib),
                     "--images", "2", "--mp-table", str(work / "mp_table.json")]) == 0
        shutil.copy(work / "model.precision.json", dest / "model.precision.json")
        shutil.copy(work / "model.tflite", dest / "model.tflite")  # the APK bundles it as its default model
        annotated = work / "model.mp_table.json"
        shutil.copy(annotated if annotated.is_file() else work / "mp_table.json", dest / "mp_table.json")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    (GOLDEN / "preprocess.json").write_text(json.dumps(preprocess_cases()))
    precision_files(GOLDEN)
    print(f"wrote {sorted(p.name for p in GOLDEN.iterdir())}")


if __name__ == "__main__":
    main()
