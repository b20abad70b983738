"""`toolchain compare` on the tiny preset: table layout, numbers that must order, grids, caching."""

from __future__ import annotations

import json

import pytest
import torch


from toolchain.cli import main


def test_compare_writes_grouped_table_grids_and_reuses_its_cache(tiny_model_path, calib_dir, tmp_path, monkeypatch):
    spec = [{"label": "MinMax", "method": "minmax", "bits": ["w4a4", "w8a8"]},
            {"label": "MinMax-MP", "method": "minmax", "bits": ["w4a4"], "mp": {"metric": "mse", "images": 2, "pins": ["conv_out$=8"]}}]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    args = ["compare", "--spec", str(tmp_path / "spec.json"), "--model", str(tiny_model_path), "--calib", str(calib_dir),
            "--eval", str(calib_dir), "--out", str(tmp_path / "out"), "--name", "cmp", "--device", "cpu"]
    assert main(args) == 0
    doc = json.loads((tmp_path / "out" / "cmp.json").read_text())
    rows = {(r["label"], r["bits"]): r for r in doc["rows"]}
    mp = next(r for r in doc["rows"] if r["label"] == "MinMax-MP")
    assert mp["bits"].startswith("W4A") and float(mp["bits"][3:]) <= 4.0 + 1e-9  # the solver respected the A4 budget
    rows.pop(("MinMax-MP", mp["bits"]))
    assert set(rows) == {("LQ input", "-"), ("FP", "W32A32"), ("MinMax", "W4A4"), ("MinMax", "W8A8")}
    # an 8-bit model is closer to the float model than a 4-bit one, and smaller models are smaller
    assert rows[("MinMax", "W8A8")]["vs_fp"]["psnr"] > rows[("MinMax", "W4A4")]["vs_fp"]["psnr"] + 5
    assert rows[("MinMax", "W4A4")]["accounting"]["honest"]["size_MB"] < rows[("MinMax", "W8A8")]["accounting"]["honest"]["size_MB"]
    # the markdown table is grouped by bit setting (W8A8 before W4A4) whatever order the runs had
    md = (tmp_path / "out" / "cmp.md").read_text().splitlines()
    order = [line.split("|")[1].strip() + " " + line.split("|")[2].strip() for line in md[2:] if line.startswith("|")]
    assert order == ["- LQ input", "W32A32 FP", "W8A8 MinMax", "W4A4 MinMax", f"{mp['bits']} MinMax-MP"]
    assert (tmp_path / "out" / "cmp_grid_w4a4.png").is_file() and (tmp_path / "out" / "cmp_grid_w8a8.png").is_file()
    # at 32 px NIQE cannot run (96 px patch) and dlib finds no face: missing with the reason, not a crash
    assert "96" in doc["skipped_metrics"]["niqe"] and "niqe" not in doc["metrics"]
    for r in doc["rows"]:
        assert "niqe" not in r["vs_hq"] and "no face" in r["vs_hq"]["missing"]["identity_deg"] and r["vs_hq"]["faces_detected"] == 0
    md_text = (tmp_path / "out" / "cmp.md").read_text()
    w4 = _md_cells(md_text, "MinMax-MP")
    for col in ("ID° (dlib)↓", "LMD (px)↓", "NIQE↓", "ID° vs FP↓", "LMD vs FP↓"):
        assert w4[col].startswith("n/a [")
    assert f"{w4['NIQE↓'][4:]}: {doc['skipped_metrics']['niqe']}" in md_text
    assert f"{w4['ID° (dlib)↓'][4:]}: {mp['vs_hq']['missing']['identity_deg']}" in md_text

    # a rerun finds every checkpoint in its cache and quantizes nothing
    import toolchain.compare as compare_module

    def refuse(*a, **k):
        raise AssertionError("cached run was quantized again")

    monkeypatch.setattr(compare_module, "quantize_", refuse)
    assert main(args) == 0
    again = json.loads((tmp_path / "out" / "cmp.json").read_text())
    # quantized rows come from the cache unchanged; FP is restored afresh (oneDNN may flip one 8-bit rounding)
    assert [r["vs_hq"]["psnr"] for r in again["rows"] if "method" in r] == [r["vs_hq"]["psnr"] for r in doc["rows"] if "method" in r]
    assert [r["vs_hq"]["psnr"] for r in again["rows"]] == pytest.approx([r["vs_hq"]["psnr"] for r in doc["rows"]], abs=1e-3)


def _md_cells(md_text: str, label: str) -> dict[str, str]:
    """{column header: cell} of the markdown row with ``label`` in the Method column."""
    lines = md_text.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(head) and cells[1] == label:
            return dict(zip(head, cells))
    raise AssertionError(f"no row {label}")


def test_compare_face_metrics_equal_the_metric_functions_on_the_same_outputs(tmp_path, monkeypatch):
    """At 96 px (NIQE's minimum) on one bundled face: identity_deg / lmd vs HQ and NIQE of every output
    equal toolchain.eval.face / niqe called directly on the very tensors compare restored; the random tiny
    network's output holds no face, so vs FP the two face metrics are missing with the detector's reason
    (and FD-STLPIPS, a set metric, is missing for one image). One image keeps the test near 30 s on 2 cores."""
    import dataclasses

    import numpy as np
    import pytest
    import torch

    dlib = pytest.importorskip("dlib")
    import toolchain.compare as compare_module
    from toolchain.calibration import BUNDLED_FACES
    from toolchain.calibration.dataset import CalibrationSet, build_calibration_set
    from toolchain.eval import face
    from toolchain.eval.niqe import niqe
    from toolchain.models import build_model, preset, save_model

    # the tiny preset at 96 px, its UNet attention moved to the low-resolution level (3× cheaper at this size)
    tiny = preset("tiny")
    unet = dict(tiny.unet, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
    model_path = tmp_path / "tiny96.safetensors"
    save_model(build_model(dataclasses.replace(tiny, image_size=96, unet=unet), seed=0), model_path)
    data = build_calibration_set([BUNDLED_FACES], tmp_path / "set", n=1, size=96, seed=0, progress=False)
    restored: dict[str, torch.Tensor] = {}
    real_restore = compare_module.restore_set

    def recording_restore(model, batches, device, desc):
        restored[desc] = real_restore(model, batches, device, desc)
        return restored[desc]

    monkeypatch.setattr(compare_module, "restore_set", recording_restore)

    class _NoAccounting:  # params/ops are tested above; their two hooked forwards took over half the time
        def to_dict(self, per_layer=False):
            return {}

    monkeypatch.setattr(compare_module, "count", lambda model, example: _NoAccounting())
    (tmp_path / "spec.json").write_text(json.dumps([{"label": "MinMax", "method": "minmax", "bits": ["w8a8"]}]))
    assert main(["compare", "--spec", str(tmp_path / "spec.json"), "--model", str(model_path), "--calib", str(data), "--eval", str(data),
                 "--out", str(tmp_path / "out"), "--name", "cmp", "--device", "cpu"]) == 0
    doc = json.loads((tmp_path / "out" / "cmp.json").read_text())
    rows = {r["label"]: r for r in doc["rows"]}
    hq = (torch.cat(CalibrationSet.open(data).batches(96, 8, which="hq")) + 1) / 2
    fp, q = restored["FP"], restored["MinMax w8a8"]
    u8 = lambda x: [np.ascontiguousarray((i.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()) for i in x]  # noqa: E731
    detector = dlib.get_frontal_face_detector()
    found = lambda x: sum(bool(len(detector(i, 0)) or len(detector(i, 1))) for i in u8(x))  # noqa: E731
    assert found(hq) == 1 and found(fp) == 0  # the bundled face is found at 96 px, the random network's output holds none

    assert doc["metrics"] == ["psnr", "ssim", "st_lpips", "fd_stlpips", "identity_deg", "lmd", "niqe"] and doc["skipped_metrics"] == {}
    assert {"identity_deg", "lmd", "niqe"} <= set(doc["lower_is_better"]) and "psnr" not in doc["lower_is_better"]
    for label, out in (("FP", fp), ("MinMax", q)):
        vs_hq = rows[label]["vs_hq"]
        assert vs_hq["faces_detected"] == 1
        assert vs_hq["identity_deg"] == pytest.approx(float(face.identity_deg(out, hq).mean()), abs=1e-6)
        assert vs_hq["lmd"] == pytest.approx(float(face.lmd(out, hq).mean()), abs=1e-6)
        assert vs_hq["niqe"] == pytest.approx(float(niqe(out).mean()), abs=1e-6)
    vs_fp = rows["MinMax"]["vs_fp"]
    assert vs_fp["niqe"] == rows["MinMax"]["vs_hq"]["niqe"]  # no-reference: one value per output
    assert vs_fp["faces_detected"] == 0 and "identity_deg" not in vs_fp and "lmd" not in vs_fp
    assert "no face" in vs_fp["missing"]["identity_deg"] and "no face" in vs_fp["missing"]["lmd"]

    md = (tmp_path / "out" / "cmp.md").read_text()
    cells = _md_cells(md, "MinMax")
    assert float(cells["ID° (dlib)↓"]) == pytest.approx(rows["MinMax"]["vs_hq"]["identity_deg"], abs=0.006)
    assert float(cells["LMD (px)↓"]) == pytest.approx(rows["MinMax"]["vs_hq"]["lmd"], abs=0.006)
    assert float(cells["NIQE↓"]) == pytest.approx(rows["MinMax"]["vs_hq"]["niqe"], abs=0.006)
    note = cells["ID° vs FP↓"]
    assert note.startswith("n/a [") and cells["LMD vs FP↓"] == note
    assert f"{note[4:]}: {vs_fp['missing']['identity_deg']}" in md  # the footnote gives the reason
    assert "fd_stlpips" not in rows["MinMax"]["vs_hq"] and cells["FD-STLPIPS↓"].startswith("n/a [") and "at least 2 images" in md


def test_score_vs_counts_detected_faces_and_the_table_marks_partial_detection(tmp_path):
    """At 64 px dlib finds two of the three bundled faces: the scores are eval's (whole-crop box for the third)
    and the table says "(2/3 faces)"."""
    import numpy as np
    import pytest
    import torch
    from PIL import Image

    pytest.importorskip("dlib")
    from toolchain.calibration import BUNDLED_FACES
    from toolchain.compare import _write, score_vs
    from toolchain.eval import face

    hq = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC))).permute(2, 0, 1).float() / 255
                      for p in sorted(BUNDLED_FACES.glob("*.png"))])
    pred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(hq, (1, 1, 1, 1), mode="replicate"), 3, 1)
    found = face.faces_found(hq)
    assert sum(found) == 2
    got = score_vs(pred, hq, ["psnr", "identity_deg", "lmd"])
    assert got["faces_detected"] == 2 and "missing" not in got
    assert got["identity_deg"] == pytest.approx(float(face.identity_deg(pred, hq).mean()), abs=1e-6)
    row = {"label": "Blur", "bits": "W8A8", "vs_hq": got}
    _write([row], tmp_path, "t", tmp_path, tmp_path, tmp_path, ["psnr", "identity_deg", "lmd"], {"niqe": "too small"})
    cells = _md_cells((tmp_path / "t.md").read_text(), "Blur")
    assert cells["ID° (dlib)↓"] == f"{got['identity_deg']:.2f} (2/3 faces)" and cells["LMD (px)↓"].endswith("(2/3 faces)")
    assert cells["NIQE↓"].startswith("n/a [") and "too small" in (tmp_path / "t.md").read_text()


def test_cache_made_elsewhere_is_rescored_without_weights_or_calibration_images(tiny_model_path, calib_dir, tmp_path, monkeypatch):
    """A comparison quantized on another machine (the GPU host of benchmarks/compare_gpu.py, which cannot score
    dlib's metrics) is rebuilt here from its rows and 8-bit PNGs alone: the missing metrics are added from the
    stored images, equal to scoring those images directly, with no checkpoint weights and no calibration images."""
    import shutil

    import toolchain.compare as compare_module
    from toolchain.compare import _cached_eval, score_vs

    spec = [{"label": "MinMax", "method": "minmax", "bits": ["w6a6"]}]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    work = tmp_path / "work"

    def args(calib):
        return ["compare", "--spec", str(tmp_path / "spec.json"), "--model", str(tiny_model_path), "--calib", str(calib),
                "--eval", str(calib_dir), "--out", str(tmp_path / "out"), "--work", str(work), "--name", "cmp", "--device", "cpu"]

    monkeypatch.setattr(compare_module, "metric_plan", lambda size: (["psnr"], {}))  # "the GPU host": PSNR only
    assert main(args(calib_dir)) == 0
    first = json.loads((tmp_path / "out" / "cmp.json").read_text())["rows"][-1]
    assert set(first["vs_hq"]) == {"psnr", "psnr_per_image"}

    for f in work.rglob("model.safetensors"):  # only rows and PNGs travel back
        f.unlink()
    only_manifest = tmp_path / "calib_manifest_only"
    only_manifest.mkdir()
    shutil.copy(calib_dir / "manifest.json", only_manifest / "manifest.json")
    monkeypatch.setattr(compare_module, "metric_plan", lambda size: (["psnr", "ssim", "st_lpips"], {}))
    monkeypatch.setattr(compare_module, "quantize_", lambda *a, **k: (_ for _ in ()).throw(AssertionError("quantized again")))
    assert main(args(only_manifest)) == 0
    row = json.loads((tmp_path / "out" / "cmp.json").read_text())["rows"][-1]
    assert row["vs_hq"]["psnr"] == first["vs_hq"]["psnr"]  # kept, not recomputed
    ck = work / "minmax-w6a6"
    keys = {"eval": compare_module.sha256_file(calib_dir / "manifest.json")}
    _, images = _cached_eval(ck, keys, 8)
    from toolchain.calibration.dataset import CalibrationSet

    hq = (torch.cat(CalibrationSet.open(calib_dir).batches(images.shape[-1], 8, which="hq")) + 1) / 2
    direct = score_vs(images, hq, ["ssim", "st_lpips"])
    assert row["vs_hq"]["ssim"] == pytest.approx(direct["ssim"], abs=1e-7)
    assert row["vs_hq"]["st_lpips"] == pytest.approx(direct["st_lpips"], abs=1e-6)
    assert "ssim" in row["vs_fp"] and "st_lpips" in row["vs_fp"]


def test_damaged_cached_outputs_are_restored_again_or_named(tiny_model_path, calib_dir, tmp_path, capsys):
    """A cached entry with an unreadable row or a PNG missing counts as not cached: it is restored again from the
    checkpoint (same scores); without the checkpoint's weights the run stops with one error naming the folder."""
    spec = [{"label": "MinMax", "method": "minmax", "bits": ["w8a8"]}]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    work = tmp_path / "work"
    args = ["compare", "--spec", str(tmp_path / "spec.json"), "--model", str(tiny_model_path), "--calib", str(calib_dir),
            "--eval", str(calib_dir), "--out", str(tmp_path / "out"), "--work", str(work), "--name", "cmp", "--device", "cpu"]
    assert main(args) == 0
    first = json.loads((tmp_path / "out" / "cmp.json").read_text())["rows"][-1]
    ck = work / "minmax-w8a8"
    row_file = next(ck.glob("eval-*.json"))
    row_file.write_text(row_file.read_text()[:40])  # truncated row
    assert main(args) == 0
    assert json.loads((tmp_path / "out" / "cmp.json").read_text())["rows"][-1]["vs_hq"]["psnr"] == first["vs_hq"]["psnr"]
    next(next(ck.glob("eval-*/")).glob("*.png")).unlink()  # one output image lost
    (ck / "model.safetensors").unlink()
    capsys.readouterr()
    assert main(args) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # (tqdm bars aside)
    assert len(err) == 1 and err[0].startswith("error:") and f"delete {ck}" in err[0]
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert main(args[:2] + [str(empty)] + args[3:]) != 0
    assert "not an empty list" in capsys.readouterr().err
