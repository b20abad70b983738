"""Every user error is one `error:` line with exit status 2 and loses nothing.

One parametrised table of (command, set-up, expected exit code, message fragment, files that must
still exist / must not exist). Each row is run in-process through ``toolchain.cli.main`` and fails
before any heavy compute, so the whole table runs in seconds; a new case is one line.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toolchain.cli import main


def _photo(path: Path, size=(24, 20), colour="red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# ---- set-ups: each gets (tmp, env) and creates what its row needs ---------------------------------------

def s_photos(tmp, env):
    _photo(tmp / "photos" / "a.png")
    _photo(tmp / "photos" / "b.jpg", colour="blue")


def s_thesis(tmp, env):
    (tmp / "existing").mkdir()
    (tmp / "existing" / "thesis.txt").write_text("three years of work")


def s_file(tmp, env):
    (tmp / "existing_file").write_text("keep me")


def s_photos_and_clash(tmp, env):
    s_photos(tmp, env)
    _photo(tmp / "restored" / "a.png", colour="green")


def _ckpt_copy(tmp, env) -> Path:
    ck = tmp / "ck"
    shutil.copytree(env["ckpt"], ck)
    return ck


def _patch_meta(tmp, env, fn):
    ck = _ckpt_copy(tmp, env)
    meta = json.loads((ck / "quant_config.json").read_text())
    (ck / "quant_config.json").write_text(json.dumps(fn(meta)))
    s_photos(tmp, env)


def s_meta_null(tmp, env):
    _patch_meta(tmp, env, lambda m: None)


def s_meta_no_layers(tmp, env):
    _patch_meta(tmp, env, lambda m: {k: v for k, v in m.items() if k != "layers"})


def s_meta_no_model_config(tmp, env):
    _patch_meta(tmp, env, lambda m: {k: v for k, v in m.items() if k != "model_config"})


def s_meta_layers_list(tmp, env):
    _patch_meta(tmp, env, lambda m: {**m, "layers": list(m["layers"])})


def _patch_tensors(tmp, env, fn):
    from safetensors.torch import load_file, save_file

    ck = _ckpt_copy(tmp, env)
    state = load_file(str(ck / "model.safetensors"))
    fn(state)
    save_file(state, str(ck / "model.safetensors"))
    s_photos(tmp, env)


def _first(state, suffix):
    return next(k for k in sorted(state) if k.endswith(suffix))


def s_ckpt_nan_act_scale(tmp, env):
    _patch_tensors(tmp, env, lambda st: st[_first(st, "input_quantizer.scale")].fill_(float("nan")))


def s_ckpt_inf_zero_point(tmp, env):
    _patch_tensors(tmp, env, lambda st: st[_first(st, "input_quantizer.zero_point")].fill_(float("inf")))


def s_ckpt_zero_weight_scale(tmp, env):
    _patch_tensors(tmp, env, lambda st: st[_first(st, "weight_quantizer.scale")].__setitem__(0, 0.0))


def s_ckpt_negative_scale(tmp, env):
    _patch_tensors(tmp, env, lambda st: st[_first(st, "weight_quantizer.scale")].mul_(-1))


def s_nan_model(tmp, env):
    from safetensors.torch import load_file, save_file

    from toolchain.io.weights import read_safetensors_metadata

    state = load_file(str(env["model"]))
    state["unet.conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp / "nan.safetensors"), metadata=read_safetensors_metadata(env["model"]))
    s_photos(tmp, env)


def s_bad_metadata(tmp, env):
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(env["model"])), str(tmp / "badmeta.safetensors"), metadata={"toolchain_model_config": "{not json"})
    s_photos(tmp, env)


def s_config_null(tmp, env):
    (tmp / "cfg.json").write_text("null")


def s_config_list(tmp, env):
    (tmp / "cfg.json").write_text('["minmax", "w4a4"]')


def s_spec_object(tmp, env):
    (tmp / "spec.json").write_text('{"label": "MinMax", "method": "minmax", "bits": ["w4a4"]}')


def s_corrupt_models(tmp, env):
    (tmp / "bad.onnx").write_bytes(b"\x08\x07garbage that is no protobuf" * 10)
    (tmp / "bad.tflite").write_bytes(b"TFL3" + b"\x00garbage" * 20)


def s_dynamic_onnx(tmp, env):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("lq_image", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    y = helper.make_tensor_value_info("restored_image", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    model = helper.make_model(helper.make_graph([helper.make_node("Neg", ["lq_image"], ["restored_image"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    helper.set_model_props(model, {"quantface_spatial_multiple": "4"})
    onnx.save(model, str(tmp / "dyn.onnx"))


def s_logs(tmp, env):
    (tmp / "empty.txt").write_text("")
    (tmp / "garbage.txt").write_text("hello\nthis is not benchmark output\n")
    (tmp / "gpu_failed.txt").write_text(
        "INFO: Created TensorFlow Lite delegate for GPU.\n"
        "ERROR: Failed to apply GPU delegate.\n"
        "ERROR: Benchmarking failed.\n")


def s_float_tiff_nan(tmp, env):
    arr = np.full((20, 24), 0.5, np.float32)
    arr[3, 4] = np.nan
    (tmp / "photos").mkdir()
    Image.fromarray(arr, "F").save(tmp / "photos" / "nan.tif")


def s_animated(tmp, env):
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "green", "blue")]
    frames[0].save(tmp / "anim.gif", save_all=True, append_images=frames[1:], duration=50)


def s_not_images(tmp, env):
    (tmp / "photos").mkdir()
    (tmp / "photos" / "notes.txt").write_text("no images here")


def s_model_folder_thesis(tmp, env):
    s_thesis(tmp, env)


def s_none(tmp, env):
    pass


def s_sr_set(tmp, env):
    """x4 SR pairs: the wrong task for the same-size tiny face model."""
    from toolchain.calibration import BUNDLED_FACES
    from toolchain.calibration.dataset import build_calibration_set

    build_calibration_set([BUNDLED_FACES], tmp / "sr", n=2, size=32, seed=0, progress=False, scale=4)


def s_sr_set_and_spec(tmp, env):
    s_sr_set(tmp, env)
    (tmp / "spec.json").write_text('[{"label": "m", "method": "minmax", "bits": ["w8a8"]}]')


M, C, K, T = "{model}", "{calib}", "{ckpt}", "{tmp}"
R = ["--device", "cpu"]

# (id, argv, set-up, exit code, message fragment, files that must exist after, files that must not exist after)
TABLE = [
    # --- --out data loss -------------------------------------------------------------------------------
    ("calibrate-out-is-hq", ["calibrate", "--hq", f"{T}/photos", "--out", f"{T}/photos", "-n", "2"], s_photos, 2,
     "also an input", ["photos/a.png", "photos/b.jpg"], ["photos/manifest.json"]),
    ("calibrate-out-holds-hq", ["calibrate", "--hq", f"{T}/photos", "--out", T, "-n", "2"], s_photos, 2,
     "contains the input", ["photos/a.png"], ["manifest.json"]),
    ("calibrate-out-foreign-folder", ["calibrate", "--out", f"{T}/existing", "-n", "2"], s_thesis, 2,
     "not a calibration set", ["existing/thesis.txt"], ["existing/manifest.json"]),
    ("calibrate-out-file", ["calibrate", "--out", f"{T}/existing_file", "-n", "2"], s_file, 2, "existing file", ["existing_file"], []),
    ("quantize-out-foreign-folder", ["quantize", "--model", M, "--calib", C, "--out", f"{T}/existing", *R], s_thesis, 2,
     "not a quantized checkpoint", ["existing/thesis.txt"], ["existing/quant_config.json"]),
    ("quantize-out-file", ["quantize", "--model", M, "--calib", C, "--out", f"{T}/existing_file", *R], s_file, 2,
     "existing file", ["existing_file"], [".existing_file.work"]),
    ("quantize-out-is-calib", ["quantize", "--model", M, "--calib", C, "--out", C, *R], s_none, 2, "also an input", [], []),
    ("restore-out-is-input-folder", ["restore", f"{T}/photos", "--model", M, "--out", f"{T}/photos", *R], s_photos, 2,
     "overwrite the originals", ["photos/a.png", "photos/b.jpg"], ["photos/b.png"]),
    ("restore-out-is-input-file-folder", ["restore", f"{T}/photos/a.png", "--model", M, "--out", f"{T}/photos", *R], s_photos, 2,
     "overwrite the originals", ["photos/a.png"], []),
    ("restore-out-clash", ["restore", f"{T}/photos", "--model", M, "--out", f"{T}/restored", *R], s_photos_and_clash, 2,
     "already holds a.png", ["restored/a.png"], ["restored/b.png"]),
    ("restore-out-file", ["restore", f"{T}/photos", "--model", M, "--out", f"{T}/existing_file", *R],
     lambda t, e: (s_photos(t, e), s_file(t, e)), 2, "existing file", ["existing_file"], []),
    ("export-out-folder", ["export", "--model", M, "--target", "onnx", "--out", f"{T}/existing"], s_thesis, 2,
     "existing folder", ["existing/thesis.txt"], []),
    ("export-out-foreign-file", ["export", "--model", M, "--target", "onnx", "--out", f"{T}/existing_file"], s_file, 2,
     "not written by this command", ["existing_file"], ["existing_file.json"]),
    ("export-out-is-model", ["export", "--model", M, "--target", "onnx", "--out", M], s_none, 2, "also an input", [], []),
    ("model-convert-into-foreign-folder", ["model", "convert", M, f"{T}/existing", "--format", "dir"], s_model_folder_thesis, 2,
     "not a model folder", ["existing/thesis.txt"], ["existing/model_config.json"]),
    ("model-convert-onto-source", ["model", "convert", M, M, "--format", "file"], s_none, 2, "also an input", [], []),
    # --- option values -----------------------------------------------------------------------------------
    ("restore-batch-size-0", ["restore", f"{T}/photos", "--model", M, "--out", f"{T}/o", "--batch-size", "0", *R], s_photos, 2,
     "--batch-size", [], ["o"]),
    ("restore-batch-size-negative", ["restore", f"{T}/photos", "--model", M, "--out", f"{T}/o", "--batch-size", "-1", *R], s_photos, 2,
     "--batch-size", [], ["o"]),
    ("quantize-calib-limit-0", ["quantize", "--model", M, "--calib", C, "--out", f"{T}/o", "--calib-limit", "0", *R], s_none, 2,
     "--calib-limit", [], ["o"]),
    ("eval-limit-0", ["eval", "--data", C, "--model", M, "--out", f"{T}/o", "--limit", "0", *R], s_none, 2, "--limit", [], ["o"]),
    ("calibrate-size-unbounded", ["calibrate", "--size", "100000", "--out", f"{T}/o"], s_none, 2, "out of range", [], ["o", "o.partial"]),
    ("device-mps-missing", ["restore", f"{T}/photos", "--model", M, "--out", f"{T}/o", "--device", "mps"], s_photos, 2, "mps", [], ["o"]),
    ("device-unknown", ["restore", f"{T}/photos", "--model", M, "--out", f"{T}/o", "--device", "tpu"], s_photos, 2, "tpu", [], ["o"]),
    ("unknown-option", ["restore", f"{T}/photos", "--model", M, "--out", f"{T}/o", "--bogus"], s_photos, 2,
     "unrecognized arguments", [], ["o"]),
    ("allocate-budget-nan", ["allocate", "solve", "--out", f"{T}/alloc", "--budget-bits", "nan"], s_none, 2, "finite", [], ["alloc"]),
    ("allocate-out-file", ["allocate", "solve", "--out", f"{T}/existing_file"], s_file, 2, "existing file", ["existing_file"], []),
    ("compare-out-file", ["compare", "--spec", f"{T}/spec.json", "--model", M, "--calib", C, "--eval", C, "--out", f"{T}/existing_file", *R],
     lambda t, e: ((t / "spec.json").write_text('[{"label": "m", "method": "minmax", "bits": ["w8a8"]}]'), s_file(t, e)), 2,
     "existing file", ["existing_file"], []),
    ("compare-spec-bad-bits", ["compare", "--spec", f"{T}/spec.json", "--model", M, "--calib", C, "--eval", C, "--out", f"{T}/o", *R],
     lambda t, e: (t / "spec.json").write_text('[{"label": "m", "method": "minmax", "bits": ["w1a8x"]}]'), 2, "w4a4", [], ["o"]),
    # --- a calibration set of the other task (x4 SR pairs for a same-size face model): refused before anything is created
    ("allocate-sensitivity-wrong-task", ["allocate", "sensitivity", "--checkpoint", K, "--calib", f"{T}/sr", "--out", f"{T}/a1", *R],
     s_sr_set, 2, "SR pairs", [], ["a1", ".a1.lock"]),
    ("allocate-errors-wrong-task", ["allocate", "errors", "--checkpoint", K, "--calib", f"{T}/sr", "--out", f"{T}/a1", *R],
     s_sr_set, 2, "--task restore --out NEW_SET", [], ["a1"]),
    ("allocate-all-wrong-task", ["allocate", "all", "--checkpoint", K, "--calib", f"{T}/sr", "--out", f"{T}/a1", *R],
     s_sr_set, 2, "SR pairs", [], ["a1"]),
    ("allocate-errors-bad-bits", ["allocate", "errors", "--checkpoint", K, "--calib", C, "--out", f"{T}/a1", "--bits", "3,x", *R],
     s_none, 2, "--bits 3,x", [], ["a1"]),
    ("allocate-sensitivity-bad-bits-range", ["allocate", "sensitivity", "--checkpoint", K, "--calib", C, "--out", f"{T}/a1",
                                             "--start-bits", "9", *R], s_none, 2, "start_bits", [], ["a1"]),
    ("allocate-all-bad-pin", ["allocate", "all", "--checkpoint", K, "--calib", C, "--out", f"{T}/a1", "--pin", "conv", *R],
     s_none, 2, "--pin", [], ["a1"]),
    ("allocate-solve-no-errors", ["allocate", "solve", "--out", f"{T}/new/a1"], s_none, 2, "errors.json is missing", [], ["new"]),
    ("compare-calib-wrong-task", ["compare", "--spec", f"{T}/spec.json", "--model", M, "--calib", f"{T}/sr", "--eval", C,
                                  "--out", f"{T}/o", *R], s_sr_set_and_spec, 2, "SR pairs", [], ["o", "work"]),
    ("compare-eval-wrong-task", ["compare", "--spec", f"{T}/spec.json", "--model", M, "--calib", C, "--eval", f"{T}/sr",
                                 "--out", f"{T}/o", *R], s_sr_set_and_spec, 2, "SR pairs", [], ["o"]),
    ("export-calib-wrong-task", ["export", K, "--target", "onnx", "--calib", f"{T}/sr", "--out", f"{T}/m.onnx"], s_sr_set, 2,
     "SR pairs", [], ["m.onnx", "m.onnx.json"]),
    ("export-validate-wrong-task", ["export", K, "--target", "onnx", "--validate", "--calib", f"{T}/sr", "--out", f"{T}/m.onnx"],
     s_sr_set, 2, "SR pairs", [], ["m.onnx"]),
    ("quantize-calib-wrong-task", ["quantize", "--model", M, "--calib", f"{T}/sr", "--out", f"{T}/o", *R], s_sr_set, 2,
     "`toolchain calibrate --hq DIR --task restore --out NEW_SET`", [], ["o"]),
    # --- --param values of the wrong type (the method's Params field types) ---
    ("quantize-param-int-text", ["quantize", "--model", M, "--calib", C, "--method", "quantface", "--param", "train_steps=abc", "--out", f"{T}/o", *R], s_none, 2,
     "--param train_steps=abc: expected an integer", [], ["o", ".o.work"]),
    ("quantize-param-int-fraction", ["quantize", "--model", M, "--calib", C, "--method", "quantface", "--param", "train_steps=2.5", "--out", f"{T}/o", *R], s_none, 2,
     "--param train_steps=2.5: expected an integer", [], ["o", ".o.work"]),
    ("quantize-param-int-bool", ["quantize", "--model", M, "--calib", C, "--method", "quantface", "--param", "train_steps=true", "--out", f"{T}/o", *R], s_none, 2,
     "--param train_steps=true: expected an integer", [], ["o", ".o.work"]),
    ("quantize-param-float-text", ["quantize", "--model", M, "--calib", C, "--method", "quantface", "--param", "lr=abc", "--out", f"{T}/o", *R], s_none, 2,
     "--param lr=abc: expected a number", [], ["o", ".o.work"]),
    ("quantize-param-float-infinite", ["quantize", "--model", M, "--calib", C, "--method", "quantface", "--param", "lr=Infinity", "--out", f"{T}/o", *R], s_none, 2,
     "--param lr=Infinity: expected a finite number", [], ["o", ".o.work"]),
    ("quantize-param-bool-text", ["quantize", "--model", M, "--calib", C, "--method", "quantface", "--param", "merge=maybe", "--out", f"{T}/o", *R], s_none, 2,
     "--param merge=maybe: expected true or false", [], ["o", ".o.work"]),
    ("quantize-param-str-list", ["quantize", "--model", M, "--calib", C, "--method", "quantface", "--param", "lpips_weights=[1]", "--out", f"{T}/o", *R], s_none, 2,
     "--param lpips_weights=[1]: expected a string", [], ["o", ".o.work"]),
    ("quantize-param-int-null", ["quantize", "--model", M, "--calib", C, "--method", "quantface", "--param", "svd_rank=null", "--out", f"{T}/o", *R], s_none, 2,
     "--param svd_rank=null: expected an integer, not null", [], ["o", ".o.work"]),
    ("quantize-param-tuple-items", ["quantize", "--model", M, "--calib", C, "--method", "qartsr", "--param", "timestep_offsets=a,b",
                                    "--out", f"{T}/o", *R], s_none, 2, "timestep_offsets=a,b: expected a list whose items are each an integer",
     [], ["o"]),
    # --- broken configs and checkpoints ---------------------------------------------------------------------
    ("ckpt-meta-null", ["restore", f"{T}/photos", "--checkpoint", f"{T}/ck", "--out", f"{T}/o", *R], s_meta_null, 2, "JSON object", [], ["o"]),
    ("ckpt-meta-no-layers", ["restore", f"{T}/photos", "--checkpoint", f"{T}/ck", "--out", f"{T}/o", *R], s_meta_no_layers, 2,
     "lacks 'layers'", [], ["o"]),
    ("ckpt-meta-no-model-config", ["restore", f"{T}/photos", "--checkpoint", f"{T}/ck", "--out", f"{T}/o", *R], s_meta_no_model_config, 2,
     "lacks 'model_config'", [], ["o"]),
    ("ckpt-meta-layers-list", ["restore", f"{T}/photos", "--checkpoint", f"{T}/ck", "--out", f"{T}/o", *R], s_meta_layers_list, 2,
     "'layers' must be a JSON object", [], ["o"]),
    ("model-metadata-not-json", ["restore", f"{T}/photos", "--model", f"{T}/badmeta.safetensors", "--out", f"{T}/o", *R], s_bad_metadata, 2,
     "metadata is not JSON", [], ["o"]),
    ("config-null", ["quantize", "--model", M, "--calib", C, "--config", f"{T}/cfg.json", "--out", f"{T}/o", *R], s_config_null, 2,
     "JSON object", [], ["o"]),
    ("config-list", ["quantize", "--model", M, "--calib", C, "--config", f"{T}/cfg.json", "--out", f"{T}/o", *R], s_config_list, 2,
     "JSON object", [], ["o"]),
    ("compare-spec-object", ["compare", "--spec", f"{T}/spec.json", "--model", M, "--calib", C, "--eval", C, "--out", f"{T}/o", *R],
     s_spec_object, 2, "JSON list", [], ["o"]),
    # --- non-finite values ---------------------------------------------------------------------------------
    ("model-nan-weight", ["restore", f"{T}/photos", "--model", f"{T}/nan.safetensors", "--out", f"{T}/o", *R], s_nan_model, 2,
     "unet.conv_in.weight", [], ["o"]),
    ("quantize-nan-model", ["quantize", "--model", f"{T}/nan.safetensors", "--calib", C, "--out", f"{T}/o", *R], s_nan_model, 2,
     "non-finite", [], ["o"]),
    ("export-nan-model", ["export", "--model", f"{T}/nan.safetensors", "--target", "onnx", "--out", f"{T}/m.onnx"], s_nan_model, 2,
     "non-finite", [], ["m.onnx"]),
    ("ckpt-nan-act-scale", ["restore", f"{T}/photos", "--checkpoint", f"{T}/ck", "--out", f"{T}/o", *R], s_ckpt_nan_act_scale, 2,
     "input_quantizer.scale", [], ["o"]),
    ("ckpt-inf-zero-point", ["restore", f"{T}/photos", "--checkpoint", f"{T}/ck", "--out", f"{T}/o", *R], s_ckpt_inf_zero_point, 2,
     "input_quantizer.zero_point", [], ["o"]),
    ("ckpt-zero-weight-scale", ["restore", f"{T}/photos", "--checkpoint", f"{T}/ck", "--out", f"{T}/o", *R], s_ckpt_zero_weight_scale, 2,
     "zero or negative", [], ["o"]),
    ("ckpt-negative-scale-export", ["export", f"{T}/ck", "--target", "onnx", "--out", f"{T}/m.onnx"], s_ckpt_negative_scale, 2,
     "zero or negative", [], ["m.onnx"]),
    ("image-float-tiff-nan", ["restore", f"{T}/photos/nan.tif", "--model", M, "--out", f"{T}/o", *R], s_float_tiff_nan, 2,
     "non-finite", [], ["o"]),
    # --- images ---------------------------------------------------------------------------------------------
    ("image-animated-named", ["restore", f"{T}/anim.gif", "--model", M, "--out", f"{T}/o", *R], s_animated, 2, "animated", [], ["o"]),
    ("image-folder-without-images", ["restore", f"{T}/photos", "--model", M, "--out", f"{T}/o", *R], s_not_images, 2,
     "notes.txt (not an image)", [], ["o"]),
    # --- silent no-ops --------------------------------------------------------------------------------------
    ("rule-matches-nothing", ["quantize", "--model", M, "--calib", C, "--rule", "no_such_layer=w8a8", "--out", f"{T}/o", *R], s_none, 2,
     "no_such_layer", [], ["o", ".o.work"]),
    ("include-matches-nothing", ["quantize", "--model", M, "--calib", C, "--include", "^nothing\\.", "--out", f"{T}/o", *R], s_none, 2,
     "^nothing", [], ["o"]),
    ("eval-unknown-metric", ["eval", "--data", C, "--model", M, "--out", f"{T}/o", "--metrics", "psnr,nosuch", *R], s_none, 2,
     "unknown metric 'nosuch'", [], ["o/report.json"]),
    ("profile-empty-logcat", ["profile", "--logcat", f"{T}/empty.txt", "--out", f"{T}/p"], s_logs, 2, "empty", [], ["p"]),
    ("profile-garbage-parse", ["profile", "--parse", f"{T}/garbage.txt", "--out", f"{T}/p"], s_logs, 2, "no inference timings", [], ["p"]),
    ("profile-gpu-delegate-failed", ["profile", "--parse", f"{T}/gpu_failed.txt", "--out", f"{T}/p"], s_logs, 2,
     "Benchmarking failed.", [], ["p"]),
    ("profile-garbage-logcat", ["profile", "--logcat", f"{T}/garbage.txt", "--out", f"{T}/p"], s_logs, 2, "QuantFaceDemo", [], ["p"]),
    # --- profile inputs -------------------------------------------------------------------------------------
    ("profile-out-file", ["profile", "--parse", f"{T}/gpu_failed.txt", "--out", f"{T}/existing_file"],
     lambda t, e: (s_logs(t, e), s_file(t, e)), 2, "existing file", ["existing_file"], []),
    ("profile-missing-log", ["profile", "--parse", f"{T}/nothing.txt", "--out", f"{T}/p"], s_none, 2, "not found", [], ["p"]),
    ("profile-missing-model", ["profile", f"{T}/nothing.onnx", "--out", f"{T}/p"], s_none, 2, "not found", [], ["p"]),
    ("profile-corrupt-onnx", ["profile", f"{T}/bad.onnx", "--out", f"{T}/p"], s_corrupt_models, 2, "not an ONNX model", [], ["p"]),
    ("profile-corrupt-tflite", ["profile", f"{T}/bad.tflite", "--out", f"{T}/p"], s_corrupt_models, 2, "not a TFLite model", [], ["p"]),
    ("profile-dynamic-onnx-no-shape", ["profile", f"{T}/dyn.onnx", "--out", f"{T}/p"], s_dynamic_onnx, 2, "--shape lq_image=", [], ["p"]),
    ("profile-dynamic-onnx-bad-multiple", ["profile", f"{T}/dyn.onnx", "--shape", "lq_image=1x3x33x31", "--out", f"{T}/p"],
     s_dynamic_onnx, 2, "multiples of 4", [], ["p"]),
    ("profile-bad-shape", ["profile", f"{T}/dyn.onnx", "--shape", "1xAx3", "--out", f"{T}/p"], s_dynamic_onnx, 2, "--shape expects", [], ["p"]),
]


@pytest.fixture(scope="module")
def env(tiny_model_path, calib_dir, tmp_path_factory):
    """The tiny model, the shared calibration set and one W8A8 MinMax checkpoint of the tiny model."""
    ck = tmp_path_factory.mktemp("errtable") / "ck"
    assert main(["quantize", "--model", str(tiny_model_path), "--method", "minmax", "--bits", "w8a8", "--calib", str(calib_dir),
                 "--calib-limit", "2", "--out", str(ck), "--device", "cpu"]) == 0
    return {"model": tiny_model_path, "calib": calib_dir, "ckpt": ck}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", TABLE, ids=[row[0] for row in TABLE])
def test_cli_error_table(case, env, tmp_path, capsys):
    _, argv, setup, code, fragment, must_exist, must_not_exist = case
    work = tmp_path / "w"
    work.mkdir()
    setup(work, env)
    before = _snapshot(work)
    calib_before = _snapshot(env["calib"])
    subst = {"{tmp}": str(work), "{model}": str(env["model"]), "{calib}": str(env["calib"]), "{ckpt}": str(env["ckpt"])}
    args = []
    for a in argv:
        for k, v in subst.items():
            a = a.replace(k, v)
        args.append(a)
    capsys.readouterr()
    assert main(args) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0] and fragment in err[0], err[0]
    for rel in must_exist:
        assert (work / rel).exists(), rel
    for rel in must_not_exist:
        assert not (work / rel).exists(), rel
    # nothing the user had was changed or deleted, and no stray staging/lock files were left behind
    after = _snapshot(work)
    assert {k: v for k, v in after.items() if k in before} == before
    assert not [k for k in after if k not in before and (".partial" in k or k.endswith(".lock"))]
    assert _snapshot(env["calib"]) == calib_before


def test_verbose_shows_the_traceback(tmp_path, capsys):
    assert main(["calibrate", "--size", "100000", "--out", str(tmp_path / "o"), "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_read_only_or_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    """EROFS/ENOSPC while writing: one line naming the path, exit 2, no partial artifact (root ignores chmod, so the
    OS error is injected where every artifact is written)."""
    import errno

    import toolchain.io.atomic as atomic

    for err_no in (errno.EROFS, errno.ENOSPC):
        def fail(*a, **k):
            raise OSError(err_no, os.strerror(err_no), str(tmp_path / "o"))

        monkeypatch.setattr(atomic.tempfile, "mkstemp", fail)
        assert main(["calibrate", "-n", "1", "--size", "16", "--out", str(tmp_path / "o")]) == 2
        err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
        assert len(err) == 1 and os.strerror(err_no) in err[0] and str(tmp_path / "o") in err[0]
        assert not (tmp_path / "o").exists()
        monkeypatch.undo()


def test_pickle_refusal_never_suggests_weights_only_false(tmp_path, capsys):
    import pickle

    class Obj:
        def __reduce__(self):
            return (print, ("x",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": Obj()}))
    assert main(["model", "info", str(tmp_path / "evil.pt"), "--preset", "tiny"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: refusing to load") and "do not load it with weights_only=False" in line
    assert "In PyTorch" not in line and not line.rstrip().endswith("(")  # PyTorch's advice is not quoted, nothing cut off


def test_help_lists_metrics_and_parts_and_is_light():
    """--help needs no torch: the names the parser lists are kept in the command modules and must agree with the libraries."""
    import subprocess
    import sys

    from toolchain.export.parts import PARTS
    from toolchain.commands.evaluate import METRIC_NAMES
    from toolchain.commands.export import PARTS as CLI_PARTS
    from toolchain.eval.metrics import PAIRED_METRICS, SET_METRICS

    assert set(METRIC_NAMES) == set(PAIRED_METRICS + SET_METRICS) and CLI_PARTS == PARTS
    code = ("import sys, toolchain.cli as c\n"
            "try:\n    c.main(['eval', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'LIGHT')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}).stdout
    assert out.strip().endswith("LIGHT")
    for name in METRIC_NAMES:
        assert name in out


def test_help_texts_follow_the_code(capsys):
    """`model init --help` lists every preset of toolchain.models.configs.PRESETS; restore/top-level help mention
    x4 SR; quantize --batch-size says it is the global batch under --nproc-per-node."""
    from toolchain.cli import build_parser
    from toolchain.commands.model import PRESET_NAMES
    from toolchain.models.configs import PRESETS

    assert PRESET_NAMES == tuple(PRESETS)

    def help_of(*argv):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*argv, "--help"])
        return " ".join(capsys.readouterr().out.split())

    init = help_of("model", "init")
    assert all(name in init for name in PRESETS)
    assert "4x" in help_of("restore") and "OSEDiff" in help_of("restore")
    assert "OSEDiff" in help_of() and "super-resolution" in help_of()
    assert "global batch, split across" in help_of("quantize")


def test_model_info_shows_the_upscale_factor(tmp_path, capsys):
    from toolchain.models import build_model, preset, save_model

    save_model(build_model(preset("osediff-tiny"), seed=0), tmp_path / "sr.safetensors")
    assert main(["model", "info", str(tmp_path / "sr.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["upscale"] == 4 and info["output_size"] == 4 * info["image_size"]
