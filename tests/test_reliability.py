"""Issue 20's positive cases: what must *work* (resume, locks, Ctrl-C, image formats, permissions, stdout).

The refusals are in test_cli_errors.py's table; here each test checks real behaviour against an
independent reference (Pillow's own conversions, a clean build, ONNX Runtime itself).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toolchain.cli import main

REPO = Path(__file__).resolve().parents[1]


# ---- image reader ------------------------------------------------------------------------------------------

def test_sixteen_bit_grey_is_scaled_by_bit_depth_not_data_max(tmp_path):
    from toolchain.io.images import load_image

    rng = np.random.default_rng(0)
    a8 = rng.integers(0, 256, size=(20, 24), dtype=np.uint8)
    Image.fromarray(a8, "L").save(tmp_path / "g8.png")
    Image.fromarray(a8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # the same photo at 16 bits
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    g8, g16 = load_image(tmp_path / "g8.png"), load_image(tmp_path / "g16.png")
    assert g16.mode == "L" and np.abs(g16.rgb - g8.rgb).max() < 1e-6
    # a nearly black 16-bit photo (every value <= 255) stays nearly black
    Image.fromarray(a8.astype(np.uint16)).save(tmp_path / "dark16.png")
    dark = load_image(tmp_path / "dark16.png")
    assert np.allclose(dark.rgb[..., 0], a8 / 65535.0, atol=1e-7) and dark.rgb.max() <= 255 / 65535 + 1e-7


def test_float_tiff_read_as_stored_and_kept_grey(tmp_path):
    from toolchain.io.images import load_image

    f = np.random.default_rng(1).random((18, 22)).astype(np.float32)
    Image.fromarray(f, "F").save(tmp_path / "f.tif")
    im = load_image(tmp_path / "f.tif")
    assert im.mode == "L" and np.abs(im.rgb[..., 1] - f).max() < 1e-6


def test_palette_cmyk_alpha_and_exif_orientation_follow_pillow(tmp_path):
    from toolchain.io.images import load_image

    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (16, 12, 3), dtype=np.uint8), "RGB")
    rgb.convert("P", palette=Image.ADAPTIVE, colors=16).save(tmp_path / "pal.png")
    rgb.convert("CMYK").save(tmp_path / "cmyk.tif")
    la = Image.merge("LA", (rgb.convert("L"), Image.fromarray(rng.integers(0, 256, (16, 12), dtype=np.uint8))))
    la.save(tmp_path / "la.png")
    for name in ("pal.png", "cmyk.tif"):
        ref = np.asarray(Image.open(tmp_path / name).convert("RGB"), np.float32) / 255
        assert np.abs(load_image(tmp_path / name).rgb - ref).max() < 1e-6
    got = load_image(tmp_path / "la.png")
    assert got.mode == "LA" and np.abs(got.alpha - np.asarray(la)[..., 1] / 255).max() < 1e-6
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    rgb.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rot.jpg").size == (16, 12)  # (width, height) after the EXIF rotation


def test_restore_folder_processes_every_pillow_format_and_names_what_it_skips(tiny_model_path, tmp_path, capsys):
    src = tmp_path / "mixed"
    src.mkdir()
    base = Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 18, 3), dtype=np.uint8), "RGB")
    base.save(src / "a.png")
    base.convert("P").save(src / "b.gif")
    base.save(src / "c.ppm")
    base.save(src / "d.jfif", format="JPEG")
    base.save(src / "e.jpe", format="JPEG")
    base.save(src / "f.tga")
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "green", "blue")]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=40)
    (src / "x.txt").write_text("not an image")
    assert main(["restore", str(src), "--model", str(tiny_model_path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "restored 6, skipped 2: anim.gif (animated), x.txt (not an image)" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    assert all(Image.open(p).size == (18, 20) for p in (tmp_path / "out").iterdir())
    # the same command again replaces its own outputs (marked in the PNG Software field), not a user's file
    assert main(["restore", str(src), "--model", str(tiny_model_path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    Image.new("RGB", (4, 4)).save(tmp_path / "out" / "a.png")  # now a.png is the user's
    assert main(["restore", str(src), "--model", str(tiny_model_path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert Image.open(tmp_path / "out" / "a.png").size == (4, 4) and "already holds a.png" in capsys.readouterr().err


def test_calibrate_hq_uses_every_still_image_and_lists_the_rest(tmp_path, capsys):
    hq = tmp_path / "hq"
    hq.mkdir()
    face = Image.fromarray(np.random.default_rng(4).integers(0, 256, (24, 24, 3), dtype=np.uint8), "RGB")
    face.convert("P").save(hq / "a.gif")
    face.save(hq / "b.ppm")
    (hq / "notes.txt").write_text("x")
    assert main(["calibrate", "--hq", str(hq), "-n", "2", "--size", "16", "--out", str(tmp_path / "set")]) == 0
    out = capsys.readouterr().out
    assert "from 2 source image(s)" in out and "skipped 1: notes.txt (not an image)" in out
    items = json.loads((tmp_path / "set" / "manifest.json").read_text())["items"]
    assert [it["source"] for it in items] == ["a.gif", "b.ppm"]


# ---- calibrate: resume, restart, lock, --out ---------------------------------------------------------------

def _count_degrade(monkeypatch, stop_at: int | None = None) -> list[int]:
    import toolchain.calibration.dataset as ds

    calls: list[int] = []
    real = ds.degrade

    def spy(hq, seed, index, config=None):
        if stop_at is not None and index == stop_at:
            raise KeyboardInterrupt
        calls.append(index)
        return real(hq, seed, index, config)

    monkeypatch.setattr(ds, "degrade", spy)
    return calls


def test_interrupted_calibrate_resumes_and_equals_a_clean_build(tmp_path, monkeypatch, capsys):
    args = ["calibrate", "-n", "5", "--size", "32", "--seed", "3"]
    calls = _count_degrade(monkeypatch, stop_at=3)
    assert main(args + ["--out", str(tmp_path / "set")]) == 130
    assert calls == [0, 1, 2] and (tmp_path / "set.partial").is_dir() and not (tmp_path / "set").exists()
    monkeypatch.undo()
    calls = _count_degrade(monkeypatch)
    assert main(args + ["--out", str(tmp_path / "set")]) == 0
    assert calls == [3, 4], "the rerun must resume after the three finished pairs"
    monkeypatch.undo()
    assert main(args + ["--out", str(tmp_path / "clean")]) == 0
    for sub in ("hq", "lq"):
        for p in sorted((tmp_path / "clean" / sub).iterdir()):
            assert p.read_bytes() == (tmp_path / "set" / sub / p.name).read_bytes()
    clean = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert json.loads((tmp_path / "set" / "manifest.json").read_text()) == clean


def test_calibrate_with_other_settings_restarts_and_says_why(tmp_path, monkeypatch, capsys):
    _count_degrade(monkeypatch, stop_at=2)
    assert main(["calibrate", "-n", "4", "--size", "32", "--seed", "1", "--out", str(tmp_path / "set")]) == 130
    monkeypatch.undo()
    calls = _count_degrade(monkeypatch)
    capsys.readouterr()
    assert main(["calibrate", "-n", "4", "--size", "32", "--seed", "2", "--out", str(tmp_path / "set")]) == 0
    assert calls == [0, 1, 2, 3]
    assert "not resuming" in capsys.readouterr().err and json.loads((tmp_path / "set" / "manifest.json").read_text())["seed"] == 2


def test_out_replaces_its_own_artifact_and_foreign_ones_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["calibrate", "-n", "1", "--size", "16", "--out", str(out)]) == 0
    assert main(["calibrate", "-n", "2", "--size", "16", "--out", str(out)]) == 0  # a previous calibration set: replaced
    assert len(json.loads((out / "manifest.json").read_text())["items"]) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert main(["calibrate", "-n", "1", "--size", "16", "--out", str(tmp_path / "other")]) == 2
    assert main(["calibrate", "-n", "1", "--size", "16", "--out", str(tmp_path / "other"), "--overwrite"]) == 0
    assert not (tmp_path / "other" / "notes.txt").exists() and (tmp_path / "other" / "manifest.json").is_file()
    # --overwrite never extends to the inputs
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (20, 20), "red").save(photos / "a.png")
    capsys.readouterr()
    assert main(["calibrate", "--hq", str(photos), "-n", "1", "--size", "16", "--out", str(photos), "--overwrite"]) == 2
    assert (photos / "a.png").is_file() and "also an input" in capsys.readouterr().err


def test_second_run_on_the_same_out_is_refused_with_one_line(tmp_path, capsys):
    from toolchain.io.outputs import lock_path, output_lock

    out = tmp_path / "set"
    with output_lock(out):
        assert lock_path(out).is_file()
        assert main(["calibrate", "-n", "1", "--size", "16", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another toolchain run" in err[0] and f"pid {os.getpid()}" in err[0]
    assert not lock_path(out).exists() and not out.exists() and not Path(str(out) + ".partial").exists()
    assert main(["calibrate", "-n", "1", "--size", "16", "--out", str(out)]) == 0  # released: the next run proceeds


def test_concurrent_processes_one_wins_one_line_for_the_other(tmp_path):
    """A process that finds --out locked by another process exits 2 with the one lock line and writes nothing;
    once the holder is done, the same command runs. The holder is a real process that keeps the lock until
    the test releases it, so nothing depends on how fast either side runs (a version that raced two
    calibrate runs failed when the first finished before the second reached its lock)."""
    from toolchain.io.outputs import lock_path

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "set"
    hold = ("import sys\nfrom toolchain.io.outputs import output_lock\nwith output_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cmd = [sys.executable, "-m", "toolchain", "calibrate", "-n", "2", "--size", "16", "--out", str(out)]
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "another toolchain run" in second.stderr and "Traceback" not in second.stderr
        assert len([l for l in second.stderr.splitlines() if l.strip()]) == 1
        assert not out.exists() and not (tmp_path / "set.partial").exists()
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert len(json.loads((out / "manifest.json").read_text())["items"]) == 2
    assert not lock_path(out).exists()


# ---- quantize resume -----------------------------------------------------------------------------------

def test_quantize_work_folder_is_kept_only_for_identical_inputs(tmp_path, capsys):
    import argparse

    from toolchain.commands.quantize import build_config, run_inputs
    from toolchain.io.resume import prepare_workdir

    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "manifest.json").write_text("{}")

    def inputs(bits, lr):
        ns = argparse.Namespace(config=None, method="quantface", bits=bits, include=None, exclude=[], rule=[], mp_table=None,
                                param=[f"lr={lr}"], preset=None, calib=calib, calib_limit=None, batch_size=4, seed=0)
        return run_inputs(ns, build_config(ns), model)

    work = tmp_path / ".ck.work"
    prepare_workdir(work, inputs("w4a4", 1e-5))
    (work / "trainer_state.pt").write_bytes(b"step 6/12")
    prepare_workdir(work, inputs("w4a4", 1e-5))  # same inputs: resume
    assert (work / "trainer_state.pt").is_file()
    capsys.readouterr()
    prepare_workdir(work, inputs("w6a6", 1e-4))  # other bits and lr: start over, say why
    assert not (work / "trainer_state.pt").exists()
    assert "quant_config changed" in capsys.readouterr().err
    (work / "trainer_state.pt").write_bytes(b"x")
    model.write_bytes(b"other weights")  # same options, other model file
    prepare_workdir(work, inputs("w6a6", 1e-4))
    assert not (work / "trainer_state.pt").exists() and "model_sha256 changed" in capsys.readouterr().err


def test_lpips_fallback_warning_names_the_real_option_once(capsys):
    import toolchain.lowrank.losses as L

    L.perceptual_loss(None)
    err = [l for l in capsys.readouterr().err.splitlines() if "LPIPS weights not given" in l]
    assert len(err) == 1 and "--param lpips_weights=PATH" in err[0] and "--lpips-weights" not in err[0]


# ---- Ctrl-C ------------------------------------------------------------------------------------------

def test_swallowed_interrupt_still_exits_130(monkeypatch, capsys):
    import toolchain.commands.methods as methods_cmd

    def swallowing(args):
        try:  # what a library's callback did during a TFLite export
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        return 0

    monkeypatch.setattr(methods_cmd, "run", swallowing)
    assert main(["methods"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted")


def test_interrupt_turned_into_another_error_still_exits_130(monkeypatch, capsys):
    import toolchain.commands.methods as methods_cmd

    def converting(args):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise RuntimeError("converter aborted") from None
        return 0

    monkeypatch.setattr(methods_cmd, "run", converting)
    assert main(["methods"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted")


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.8])
def test_ctrl_c_while_imports_load_is_one_line_and_130(tmp_path, delay):
    code = ("import sys, toolchain.cli as c\nsys.stderr.write('ready\\n'); sys.stderr.flush()\n"
            f"sys.exit(c.main(['quantize', '--calib', {str(tmp_path)!r}, '--out', {str(tmp_path / 'o')!r}, '--device', 'cpu']))")
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    assert p.stderr.readline().strip() == "ready"
    time.sleep(delay)  # main is now importing torch & co. (at different stages)
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    assert p.wait(timeout=60) == 130
    lines = [l for l in rest.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted") and "Traceback" not in rest


# ---- permissions and stdout ------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        assert main(["calibrate", "-n", "1", "--size", "16", "--out", str(tmp_path / "set")]) == 0
    finally:
        os.umask(old)
    paths = [tmp_path / "set", *(tmp_path / "set").rglob("*")]
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(stat.S_IMODE(p.stat().st_mode)))


def test_dynamic_onnx_takes_any_size_by_padding_to_its_multiple_and_stdout_is_one_json_line(tiny_model_path, tmp_path, capfd):
    """--dynamic: the graph replicate-pads height/width to the multiple its skip Concats need and crops back, so
    33x31 runs (it failed inside ORT with a Concat error); the result equals the PyTorch model run on the padded
    image and cropped, and at a multiple it equals the model itself."""
    import onnx
    import onnxruntime as ort
    import torch
    import torch.nn.functional as F

    from toolchain.models import load_model

    out = tmp_path / "dyn.onnx"
    assert main(["export", "--model", str(tiny_model_path), "--target", "onnx", "--dynamic", "--out", str(out)]) == 0
    captured = capfd.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["spatial_multiple"] == 4
    report = json.loads(Path(str(out) + ".json").read_text())
    assert report["spatial_multiple"] == 4 and report["pads_to_multiple"] is True
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert meta["quantface_spatial_multiple"] == "4" and meta["quantface_pads_to_multiple"] == "true"
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()
    fp = load_model(tiny_model_path)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for h, w in ((33, 31), (36, 28)):
        x = torch.from_numpy(rng.uniform(-1, 1, (1, 3, h, w)).astype(np.float32))
        got = sess.run(None, {"lq_image": x.numpy()})[0]
        with torch.no_grad():
            ref = fp(F.pad(x, (0, (-w) % 4, 0, (-h) % 4), mode="replicate"))[..., :h, :w].numpy()
        assert got.shape == (1, 3, h, w) and np.abs(got - ref).max() <= 1e-4
    assert main(["profile", str(out), "--shape", "lq_image=1x3x33x31", "--runs", "1", "--warmup", "1", "--out", str(tmp_path / "p")]) == 0
    prof = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert any(k.startswith("unet.") for k in prof["per_layer_ms"])  # layer names survive the padding wrapper
    # rerunning into the previous export's --out replaces it (its report marks it as ours)
    assert main(["export", "--model", str(tiny_model_path), "--target", "onnx", "--out", str(out)]) == 0
    assert "spatial_multiple" not in json.loads(Path(str(out) + ".json").read_text())


def test_native_stdout_goes_to_stderr_inside_the_guard(capfd):
    from toolchain.io.streams import stdout_to_stderr

    with stdout_to_stderr():
        print("python chatter")
        os.write(1, b"native chatter\n")  # what a converter's C++ logging does
    print('{"ok": true}')
    cap = capfd.readouterr()
    assert cap.out == '{"ok": true}\n' and "python chatter" in cap.err and "native chatter" in cap.err


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_file_group_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from toolchain.io import atomic

    for name, text in (("m.tflite", "old model"), ("m_float.tflite", "old float"), ("m.precision.json", "old precision")):
        (tmp_path / name).write_text(text)
    real = os.replace
    seen = []

    def flaky(src, dst):
        seen.append(Path(dst).name)
        if Path(dst).parent == tmp_path and Path(dst).name == "m_float.tflite" and Path(src).parent.name.endswith(".partial"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError):
        with atomic.atomic_file_group(tmp_path, "m", stale=["m.precision.json"]) as st:
            for name in ("m.tflite", "m_float.tflite"):
                (st / name).write_text("new")
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"m.tflite": "old model", "m_float.tflite": "old float",
                                                                    "m.precision.json": "old precision"}
    with atomic.atomic_file_group(tmp_path, "m", stale=["m.precision.json"]) as st:  # a float export: no precision sidecar
        for name in ("m.tflite", "m_float.tflite"):
            (st / name).write_text("new")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"m.tflite": "new", "m_float.tflite": "new"}


# ---- silent no-ops -------------------------------------------------------------------------------------

def test_mp_table_for_another_model_is_refused(tiny_model_path, calib_dir, tmp_path, capsys):
    table = {"kind": "quantface-mp-table", "version": 1, "w_bits": 4, "cost_model": "act_bits", "budget": 10.0, "cost": 8.0,
             "average_a_bits": 4.0, "layers": [{"name": f"unet.other_model.block{i}", "a_bits": 4, "w_bits": 4, "cost": 4.0} for i in range(2)]}
    (tmp_path / "mp.json").write_text(json.dumps(table))
    assert main(["quantize", "--model", str(tiny_model_path), "--calib", str(calib_dir), "--mp-table", str(tmp_path / "mp.json"),
                 "--out", str(tmp_path / "ck"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "2 of its 2 layers" in err and "another model" in err and not (tmp_path / "ck").exists()


def test_partial_gpu_delegation_is_flagged(tmp_path, capsys):
    log = ("INFO: Created TensorFlow Lite delegate for GPU.\n"
           "INFO: 16 operations will run on the GPU, and the remaining 166 operations will run on the CPU.\n"
           "INFO: Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.\n"
           "INFO: count=3 first=90000 curr=85000 min=84000 max=90000 avg=86000 std=2000\n"
           "INFO: Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.\n"
           "INFO: count=50 first=41000 curr=42000 min=40000 max=48000 avg=41750 std=1730\n")
    (tmp_path / "bm.txt").write_text(log)
    assert main(["profile", "--parse", str(tmp_path / "bm.txt"), "--out", str(tmp_path / "p")]) == 0
    cap = capsys.readouterr()
    summary = json.loads(cap.out.strip().splitlines()[-1])
    assert summary["partial_delegation"] is True and summary["median_ms"] == pytest.approx(41.75)
    assert "fell back to the CPU" in cap.err
    report = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert report["delegation"][0] == {"delegated_nodes": 16, "total_nodes": 182, "delegate": "GPU", "partitions": None}


def test_pin_matching_no_layer_is_refused(tmp_path):
    from toolchain.alloc.allocate import SolveSettings, build_table
    from toolchain.errors import ConfigError

    errors = {"bits": [3, 4], "layers": {"unet.conv_in": {"errors": {"3": 2.0, "4": 1.0}, "elements": 10, "macs": 100, "w_bits": 4, "order": 0}}}
    with pytest.raises(ConfigError, match="no_such_layer"):
        build_table({}, errors, SolveSettings(pins=[("no_such_layer$", 8)]), "ck", tmp_path)
    assert not (tmp_path / "mp_table.json").exists()


def test_skipped_metrics_are_announced_on_stderr(tiny_model_path, calib_dir, tmp_path, capsys):
    assert main(["eval", "--data", str(calib_dir), "--model", str(tiny_model_path), "--out", str(tmp_path / "ev"), "--limit", "2",
                 "--metrics", "psnr,lpips", "--weights-dir", str(tmp_path), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "warning: metric lpips skipped" in err and "alexnet-owt-7be5be79.pth" in err


def test_restore_folder_skips_unusable_images_and_names_them(tiny_model_path, tmp_path, capsys):
    """Inside a folder a too-small, truncated or NaN image is skipped and listed (like a non-image);
    the same file named on the command line is still an error."""
    src = tmp_path / "faces"
    src.mkdir()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (20, 18, 3), dtype=np.uint8), "RGB").save(src / "a.png")
    Image.new("RGB", (1, 3)).save(src / "s13.png")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.png")
    (src / "t.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])  # header only: truncated
    Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32), "F").save(src / "nan.tif")
    assert main(["restore", str(src), "--model", str(tiny_model_path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "restored 1, skipped 3: " in out and "s13.png (too small (1x3))" in out and "t.png (" in out, out
    assert "nan.tif (holds 64 non-finite" in out, out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]
    assert main(["restore", str(src / "s13.png"), "--model", str(tiny_model_path), "--out", str(tmp_path / "o2"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "too small (1x3)" in err[0] and not (tmp_path / "o2").exists()


def test_param_values_take_the_type_of_the_method_parameter():
    """--param values are converted to the method's Params field types (int/float/bool/str/optional/tuple)."""
    from toolchain.commands.quantize import _parse_params

    got = _parse_params(["train_steps=3", "svd_rank=2.0", "lr=1", "merge=yes", "gradient_checkpointing=false",
                         "lpips_weights=007", "balance=scale"], "quantface")
    assert got == {"train_steps": 3, "svd_rank": 2, "lr": 1.0, "merge": True, "gradient_checkpointing": False,
                   "lpips_weights": "007", "balance": "scale"}
    assert isinstance(got["lr"], float) and isinstance(got["svd_rank"], int)
    assert _parse_params(["lpips_weights=none"], "quantface") == {"lpips_weights": None}
    assert _parse_params(["timestep_offsets=-100,0,100"], "qartsr") == {"timestep_offsets": [-100, 0, 100]}
    assert _parse_params(["timestep_offsets=[-50, 50]"], "qartsr") == {"timestep_offsets": [-50, 50]}
    assert _parse_params(["stages=unet"], "passionsr") == {"stages": ["unet"]}
    from toolchain.quant.registry import get_method

    m = get_method("qartsr", {"timestep_offsets": [-50, 50]})
    assert m.params.timestep_offsets == (-50, 50)


def test_output_into_a_closed_pipe_stops_quietly(tiny_model_path):
    """`toolchain model info X | head -1`: the reader leaves before the output is written. No traceback,
    exit 141 (128 + SIGPIPE, what a shell shows for a tool stopped by a closed pipe)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "toolchain", "model", "info", str(tiny_model_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone long before the command (seconds of imports) prints
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
