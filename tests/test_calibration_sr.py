"""`toolchain calibrate` for super-resolution: ×4 LR/HR pairs (LR = degraded HR, antialiased bicubic ÷4),
chosen by --task sr / --scale or by an osediff --model; the manifest records it; quantize and eval take
the pairs on osediff and refuse a set of the wrong task with one error line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toolchain.cli import main


@pytest.fixture(scope="module")
def sr_model_dir(tmp_path_factory):
    from toolchain.models import build_model, preset, save_model

    out = tmp_path_factory.mktemp("sr") / "osediff"
    save_model(build_model(preset("osediff-tiny"), seed=0), out, "dir")
    return out


@pytest.fixture(scope="module")
def sr_set(sr_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sr_set") / "calib"
    assert main(["calibrate", "-n", "2", "--size", "32", "--model", str(sr_model_dir), "--out", str(out)]) == 0
    return out


def test_sr_pairs_are_degraded_hr_downscaled_by_four(sr_set, tmp_path):
    from toolchain.calibration.degrade import DegradationConfig, degrade
    from toolchain.io.images import load_image

    man = json.loads((sr_set / "manifest.json").read_text())
    assert (man["task"], man["scale"], man["lq_size"], man["size"]) == ("sr", 4, 8, 32)
    for i, item in enumerate(man["items"]):
        hq = load_image(sr_set / "hq" / item["file"]).rgb
        lq = load_image(sr_set / "lq" / item["file"]).rgb
        assert hq.shape == (32, 32, 3) and lq.shape == (8, 8, 3)
        # independent reference: the same seeded degradation of the stored HR, then a 4×4 box-ish antialiased bicubic
        deg, _ = degrade(hq, man["seed"], i, DegradationConfig())
        ref = F.interpolate(torch.from_numpy(deg).permute(2, 0, 1)[None], size=(8, 8), mode="bicubic", antialias=True,
                            align_corners=False).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        assert np.abs(lq - ref).max() <= 1.5 / 255  # both sides stored as 8-bit PNG
    # --task sr gives the same set as --model osediff (scale 4 either way)
    assert main(["calibrate", "-n", "2", "--size", "32", "--task", "sr", "--out", str(tmp_path / "b")]) == 0
    for item in man["items"]:
        assert (tmp_path / "b" / "lq" / item["file"]).read_bytes() == (sr_set / "lq" / item["file"]).read_bytes()


def test_quantize_and_eval_consume_sr_pairs(sr_model_dir, sr_set, tmp_path):
    ck = tmp_path / "ck"
    assert main(["quantize", "--model", str(sr_model_dir), "--method", "minmax", "--bits", "w8a8", "--calib", str(sr_set),
                 "--out", str(ck), "--device", "cpu"]) == 0

    assert main(["eval", "--checkpoint", str(ck), "--data", str(sr_set), "--out", str(tmp_path / "ev"), "--metrics", "psnr",
                 "--device", "cpu"]) == 0
    text = " ".join(p.read_text() for p in (tmp_path / "ev").glob("*.json"))
    assert "psnr" in text
    # allocate: the sensitivity sweep scores ×4 outputs against the HR images
    assert main(["allocate", "all", "--checkpoint", str(ck), "--calib", str(sr_set), "--out", str(tmp_path / "alloc"),
                 "--images", "2", "--metric", "mse", "--epsilon", "2e-4", "--device", "cpu"]) == 0
    table = json.loads((tmp_path / "alloc" / "mp_table.json").read_text())
    assert table["layers"] and not any(".attn2.to_k" in l["name"] or ".attn2.to_v" in l["name"] for l in table["layers"])


@pytest.mark.parametrize("args,fragment", [
    (["--task", "restore", "--scale", "4"], "--scale applies to --task sr"),
    (["--size", "30", "--task", "sr"], "multiple of the SR scale"),
])
def test_bad_sr_options_are_one_error_line(args, fragment, tmp_path, capsys):
    base = ["calibrate", "-n", "1", "--size", "32", "--out", str(tmp_path / "c")]
    capsys.readouterr()
    assert main(base + args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err


def test_restoration_set_is_refused_for_an_sr_model(sr_model_dir, calib_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["quantize", "--model", str(sr_model_dir), "--method", "minmax", "--bits", "w8a8", "--calib", str(calib_dir),
                 "--out", str(tmp_path / "ck"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--task sr" in lines[0], err
