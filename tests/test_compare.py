"""`toolchain compare` on the tiny preset: table layout, numbers that must order, grids, caching."""

from __future__ import annotations

import json


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
    order = [line.split("|")[1].strip() + " " + line.split("|")[2].strip() for line in md[2:]]
    assert order == ["- LQ input", "W32A32 FP", "W8A8 MinMax", "W4A4 MinMax", f"{mp['bits']} MinMax-MP"]
    assert (tmp_path / "out" / "cmp_grid_w4a4.png").is_file() and (tmp_path / "out" / "cmp_grid_w8a8.png").is_file()

    # a rerun finds every checkpoint in its cache and quantizes nothing
    import toolchain.compare as compare_module

    def refuse(*a, **k):
        raise AssertionError("cached run was quantized again")

    monkeypatch.setattr(compare_module, "quantize_", refuse)
    assert main(args) == 0
    again = json.loads((tmp_path / "out" / "cmp.json").read_text())
    assert [r["vs_hq"]["psnr"] for r in again["rows"]] == [r["vs_hq"]["psnr"] for r in doc["rows"]]
