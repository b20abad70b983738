"""One-file pipelines (toolchain/export/pipeline.py): a TFLite with a `restore` signature and one per stage, an ONNX graph with
named stage outputs; every signature/stage against its PyTorch part, the chained stages against restore, and the
fixed-shape refusal (LiteRT cannot resize these graphs).

Measured on the tiny preset, MinMax W8A8, 2 calibration images (this 2-core AVX512-VNNI EPYC):
TFLite restore 29.5 dB min vs fake quant (fake quant vs FP 34.8 dB), vae_decoder 38.4 dB, vae_encoder max |Δ| 0.0097,
unet max |Δ| 0.18 (fake quant vs FP: 0.074), embedder (float) 4.5e-8; the chained stage signatures equal restore
exactly (max |Δ| 0). ONNX restore 33.3 dB min vs fake quant; its cut-out stages chained equal the full graph exactly.
The bounds below are those figures with margin."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from toolchain.cli import main

REPO = Path(__file__).resolve().parents[1]
STAGES = ["restore", "vae_encoder", "embedder", "unet", "vae_decoder"]


@pytest.fixture(scope="module")
def w8a8(tiny_model_path, calib_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    assert main(["quantize", "--model", str(tiny_model_path), "--bits", "w8a8", "--calib", str(calib_dir), "--out", str(root / "ck"),
                 "--device", "cpu"]) == 0
    return root


def _validated_pipeline(root, calib_dir, target: str):
    """The W8A8 checkpoint exported (--part full, the default) to ``target`` with --validate on 2 images."""
    out = root / f"pipe.{target}"
    assert main(["export", str(root / "ck"), "--target", target, "--out", str(out), "--calib", str(calib_dir), "--images", "2",
                 "--validate"]) == 0
    return out


@pytest.fixture(scope="module")
def tflite_pipeline(w8a8, calib_dir):
    return _validated_pipeline(w8a8, calib_dir, "tflite")


def _images(model, calib_dir, n=2):
    from toolchain.calibration.dataset import CalibrationSet

    return CalibrationSet.open(calib_dir).batches(model.image_size, 1, limit=n)


def test_tflite_pipeline_has_named_signatures_and_one_copy_of_each_weight(tflite_pipeline):
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    sigs = Interpreter(model_path=str(tflite_pipeline)).get_signature_list()
    assert list(sigs) == STAGES
    assert sigs["restore"] == {"inputs": ["lq_image"], "outputs": ["restored_image"]}
    assert sorted(sigs["unet"]["inputs"]) == ["prompt", "z_latent"] and sigs["unet"]["outputs"] == ["x0_latent"]
    assert sigs["vae_decoder"] == {"inputs": ["x0_latent"], "outputs": ["restored_image"]}
    rep = json.loads(Path(str(tflite_pipeline) + ".json").read_text())
    assert rep["float_fallback_layers"] == [] and rep["scale_mismatches"] == [] and rep["weight_grid_mismatches"] == []
    assert rep["signature_mismatches"] == [] and rep["layers_in_several_signatures"] == rep["layers_quantized"] > 0
    precision = json.loads(tflite_pipeline.with_suffix(".precision.json").read_text())
    assert all(r["signatures"] == 2 and r["same_in_every_signature"] and r["weight_grid_matches"] and r["integer"]
               for r in precision["layers"].values())
    # independently of the report: every integer conv/linear weight of a stage subgraph is the very buffer restore uses
    model = fbu.read_model_from_bytearray(bytearray(tflite_pipeline.read_bytes()))
    codes = [fbu.get_builtin_code_from_operator_code(c) for c in model.operatorCodes]

    def weight_buffers(sg):
        return {sg.tensors[op.inputs[1]].buffer for op in sg.operators if codes[op.opcodeIndex] in (3, 9)  # CONV_2D, FULLY_CONNECTED
                and sg.tensors[op.inputs[1]].type in (9, 17)}  # int8 / int4

    restore = weight_buffers(model.subgraphs[0])
    stages = set().union(*(weight_buffers(sg) for sg in model.subgraphs[1:]))
    assert len(restore) == rep["layers_quantized"] and stages == restore


def test_each_tflite_signature_matches_its_pytorch_part(tflite_pipeline, w8a8, calib_dir):
    """Each signature run in LiteRT (XNNPACK) on the inputs its stage sees in the fake-quant pipeline vs that PyTorch part."""
    from toolchain.export.litert.runtime import tflite_runner
    from toolchain.export.parts import part_module
    from toolchain.export.pipeline import signature_inputs, signatures_of
    from toolchain.export.validate import compare
    from toolchain.quant.checkpoint import load_quantized

    model, _ = load_quantized(w8a8 / "ck")
    data = tflite_pipeline.read_bytes()
    inputs = signature_inputs(model, _images(model, calib_dir))
    bounds = {"restore": ("psnr_db", 25.0), "vae_decoder": ("psnr_db", 32.0), "vae_encoder": ("max_abs_error", 0.03),
              "unet": ("max_abs_error", 0.4), "embedder": ("max_abs_error", 1e-5)}
    for key, (part, _, _) in signatures_of(model).items():
        run = tflite_runner(data, signature=key)
        wrapped = part_module(model, part)[0]
        for inp in inputs[key]:
            with torch.no_grad():
                ref = wrapped(*inp).numpy()
            got = compare(run(inp), ref, part in ("full", "vae_decoder"))
            metric, bound = bounds[key]
            assert (got[metric] >= bound) if metric == "psnr_db" else (got[metric] <= bound), (key, got)
    v = json.loads(Path(str(tflite_pipeline) + ".json").read_text())["validation"]
    assert set(v["signatures"]) == set(STAGES) and v["psnr_db_min"] >= 25.0


def test_tflite_stage_signatures_chained_equal_restore(tflite_pipeline, w8a8, calib_dir):
    from toolchain.export.litert.runtime import tflite_runner
    from toolchain.quant.checkpoint import load_quantized

    model, _ = load_quantized(w8a8 / "ck")
    data = tflite_pipeline.read_bytes()
    run = {k: tflite_runner(data, signature=k) for k in STAGES}
    for (image,) in [(b,) for b in _images(model, calib_dir)]:
        z = torch.from_numpy(run["vae_encoder"]((image,)))
        prompt = torch.from_numpy(run["embedder"]((image,)))
        x0 = torch.from_numpy(run["unet"]((z, prompt)))
        chained = run["vae_decoder"]((x0,))
        assert np.abs(chained - run["restore"]((image,))).max() <= 1e-6  # measured: 0 (the same ops on the same integers)
    rep = json.loads(Path(str(tflite_pipeline) + ".json").read_text())
    assert rep["validation"]["stage_chain"]["max_abs_error"] <= 1e-6


def test_fixed_shape_tflite_refuses_other_shapes_with_one_error_line(tflite_pipeline, tmp_path, capfd):
    """LiteRT cannot resize this graph (XNNPACK fails to reshape at batch 2 of the exported size), so our runner and
    profile refuse another shape with one line naming the baked shape."""
    from ai_edge_litert.interpreter import Interpreter

    from toolchain.export.litert.runtime import tflite_runner
    from toolchain.errors import InputError

    raw = Interpreter(model_path=str(tflite_pipeline)).get_signature_runner("restore")
    with pytest.raises(RuntimeError, match="failed to"):  # why we refuse: LiteRT's own resize of this graph fails
        raw(lq_image=np.zeros((2, 3, 32, 32), np.float32))
    expected = ("error: pipe.tflite: input 'lq_image' of signature 'restore' has the fixed shape 1x3x32x32 baked in at export; "
                "got 2x3x32x32 (LiteRT cannot resize this graph: resize or tile the image to 1x3x32x32 and run one image per "
                "call, as the Android demo does, or use an ONNX export with --dynamic for other sizes)")
    with pytest.raises(InputError) as exc:
        tflite_runner(tflite_pipeline.read_bytes(), name="pipe.tflite")((torch.zeros(2, 3, 32, 32),))
    assert f"error: {exc.value}" == expected
    capfd.readouterr()
    assert main(["profile", str(tflite_pipeline), "--shape", "lq_image=2x3x32x32", "--out", str(tmp_path / "p")]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [expected]
    assert main(["profile", str(tflite_pipeline), "--shape", "lq_image=1x3x48x48", "--out", str(tmp_path / "p")]) == 2
    assert "fixed shape 1x3x32x32 baked in at export; got 1x3x48x48" in capfd.readouterr().err


def test_profile_reports_every_tflite_signature(tflite_pipeline, tmp_path, capfd):
    capfd.readouterr()
    assert main(["profile", str(tflite_pipeline), "--threads", "1", "--runs", "2", "--warmup", "1", "--out", str(tmp_path / "p")]) == 0
    summary = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert list(summary["signatures_median_ms"]) == STAGES and all(v > 0 for v in summary["signatures_median_ms"].values())
    report = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert report["signature"] == "restore" and report["signatures"]["unet"]["inputs"] == {"z_latent": [1, 4, 16, 16], "prompt": [1, 8, 32]}


@pytest.fixture(scope="module")
def onnx_pipeline(w8a8, calib_dir):
    return _validated_pipeline(w8a8, calib_dir, "onnx")


def test_onnx_pipeline_stages_run_alone_and_chain_to_the_full_graph(onnx_pipeline, w8a8, calib_dir):
    """One ONNX graph: the stage tensors are named outputs, each stage cut out of the file (onnx_stage) runs in ORT on
    its own against its PyTorch part (with the float16-stored float layers rounded alike), and the cut-out stages
    chained give the full graph's output."""
    from toolchain.export.onnx_backend import FLOAT16_LAYERS_KEY
    from toolchain.export.parts import part_module
    from toolchain.export.pipeline import onnx_stage, signature_inputs
    from toolchain.export.prepare import with_float16_weights
    from toolchain.export.qdq.runtime import ort_session
    from toolchain.export.validate import compare
    from toolchain.quant.checkpoint import load_quantized

    out = onnx_pipeline
    full = ort_session(out, threads=2)
    assert [o.name for o in full.get_outputs()] == ["restored_image", "z_latent", "prompt", "x0_latent"]
    model, _ = load_quantized(w8a8 / "ck")
    model = with_float16_weights(model, json.loads(full.get_modelmeta().custom_metadata_map[FLOAT16_LAYERS_KEY]))
    images = _images(model, calib_dir)
    inputs = signature_inputs(model, images)
    stages = {k: ort_session(onnx_stage(out, k).SerializeToString(), threads=2) for k in STAGES[1:]}
    assert [i.name for i in stages["unet"].get_inputs()] == ["z_latent", "prompt"] and stages["unet"].get_inputs()[0].shape == [1, 4, 16, 16]
    bounds = {"vae_encoder": 0.03, "embedder": 1e-5, "unet": 0.4}
    for key, sess in stages.items():
        part = key
        wrapped = part_module(model, part)[0]
        names = [i.name for i in sess.get_inputs()]
        for inp in inputs[key]:
            got = sess.run(None, {n: t.numpy() for n, t in zip(names, inp)})[0]
            with torch.no_grad():
                ref = wrapped(*inp).numpy()
            c = compare(got, ref, key == "vae_decoder")
            assert (c["psnr_db"] >= 32.0) if key == "vae_decoder" else c["max_abs_error"] <= bounds[key], (key, c)
    for image in images:
        restored, z, prompt, x0 = full.run(None, {"lq_image": image.numpy()})
        z2 = stages["vae_encoder"].run(None, {"lq_image": image.numpy()})[0]
        p2 = stages["embedder"].run(None, {"lq_image": image.numpy()})[0]
        x2 = stages["unet"].run(None, {"z_latent": z2, "prompt": p2})[0]
        chained = stages["vae_decoder"].run(None, {"x0_latent": x2})[0]
        assert np.abs(chained - restored).max() <= 1e-6 and np.abs(z2 - z).max() <= 1e-6 and np.abs(x2 - x0).max() <= 1e-6
    v = json.loads(Path(str(out) + ".json").read_text())["validation"]
    assert set(v["signatures"]) == set(STAGES) and v["stage_chain"]["max_abs_error"] <= 1e-6 and v["psnr_db_min"] >= 25.0


def test_onnx_pipeline_profile_per_stage_and_fixed_shape_refusal(onnx_pipeline, tmp_path, capfd):
    import onnxruntime as ort

    from toolchain.export.qdq.runtime import ort_session

    out = onnx_pipeline
    full = ort_session(out, threads=2)
    capfd.readouterr()
    assert main(["profile", str(out), "--threads", "1", "--runs", "2", "--warmup", "1", "--out", str(tmp_path / "p")]) == 0
    assert list(json.loads(capfd.readouterr().out.strip().splitlines()[-1])["signatures_median_ms"]) == STAGES
    assert main(["profile", str(out), "--shape", "lq_image=2x3x32x32", "--out", str(tmp_path / "q")]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [
        f"error: {out}: --shape 2x3x32x32 does not fit input 'lq_image' of shape [1, 3, 32, 32] (fixed at export: export with "
        "--dynamic for other sizes)"]
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="Got invalid dimensions"):
        full.run(None, {"lq_image": np.zeros((2, 3, 32, 32), np.float32)})  # ORT itself refuses, it never runs a baked size


def test_osediff_signatures_have_no_embedder_and_a_latent_only_unet():
    from toolchain.export.pipeline import onnx_output_names, signatures_of
    from toolchain.models import build_model, preset

    model = build_model(preset("osediff-tiny"), seed=0)
    sigs = signatures_of(model)
    assert list(sigs) == ["restore", "vae_encoder", "unet", "vae_decoder"]
    assert sigs["unet"] == ("unet", ("z_latent",), "x0_latent")
    assert onnx_output_names(model) == ["restored_image", "z_latent", "x0_latent"]


def test_android_loader_uses_the_exporters_signature_names():
    """LiteRtRestorer looks up `restore` by name; its constants mirror toolchain/export/pipeline.py."""
    from toolchain.export.pipeline import RESTORE, STAGE_IO

    src = (REPO / "android_demo" / "app" / "src" / "main" / "java" / "org" / "quantface" / "demo" / "LiteRtRestorer.java").read_text()
    consts = dict(re.findall(r'static final String (\w+) = "([^"]+)";', src))
    assert consts == {"RESTORE_SIGNATURE": RESTORE, "RESTORE_INPUT": STAGE_IO[RESTORE][1][0], "RESTORE_OUTPUT": STAGE_IO[RESTORE][2]}
    assert "runSignature(inputs, outputs, RESTORE_SIGNATURE)" in src and "getInputTensorFromSignature(RESTORE_INPUT, RESTORE_SIGNATURE)" in src
