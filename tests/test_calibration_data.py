"""Degradation pipeline and calibration sets."""

import json

import numpy as np
import pytest

from toolchain.calibration import BUNDLED_FACES
from toolchain.calibration.dataset import CalibrationSet, build_calibration_set
from toolchain.calibration.degrade import degrade
from toolchain.errors import InputError


def _face():
    from toolchain.io.images import load_image

    return load_image(sorted(BUNDLED_FACES.iterdir())[0]).rgb


def test_degradation_is_deterministic_under_a_seed():
    hq = _face()
    a, pa = degrade(hq, seed=3, index=7)
    b, pb = degrade(hq, seed=3, index=7)
    c, _ = degrade(hq, seed=4, index=7)
    assert np.array_equal(a, b) and pa == pb
    assert not np.array_equal(a, c)
    assert a.shape == hq.shape and a.min() >= 0 and a.max() <= 1
    assert set(pa) == {"stage1", "stage2"} and "jpeg" in pa["stage1"] and "resize" in pa["stage2"]


def test_degradation_actually_degrades():
    hq = _face()
    lq, _ = degrade(hq, 0, 0)
    assert np.abs(lq - hq).mean() > 0.01


def test_build_is_reproducible_and_resumes(tmp_path):
    a = build_calibration_set([BUNDLED_FACES], tmp_path / "a", n=5, size=48, seed=2, progress=False)
    # an interrupted build leaves <out>.partial with some items; rerunning completes it identically
    partial = build_calibration_set([BUNDLED_FACES], tmp_path / "b", n=5, size=48, seed=2, progress=False)
    partial.rename(tmp_path / "b.partial")
    (tmp_path / "b.partial" / "manifest.json").unlink()
    for f in ["00003.png", "00004.png"]:
        (tmp_path / "b.partial" / "lq" / f).unlink()
    settings = {"seed": 2, "size": 48, "count": 5}
    manifest_a = json.loads((a / "manifest.json").read_text())
    from toolchain.calibration.degrade import DegradationConfig

    (tmp_path / "b.partial" / "settings.json").write_text(json.dumps({**settings, "degradation": DegradationConfig().to_dict(), "sources": [str(p) for p in sorted(BUNDLED_FACES.iterdir())]}))
    for item in manifest_a["items"][:3]:
        (tmp_path / "b.partial" / "lq" / item["file"].replace(".png", ".json")).write_text(json.dumps(item["params"]))
    b = build_calibration_set([BUNDLED_FACES], tmp_path / "b", n=5, size=48, seed=2, progress=False)
    for sub in ("hq", "lq"):
        for f in (a / sub).iterdir():
            assert f.read_bytes() == (b / sub / f.name).read_bytes()
    assert json.loads((b / "manifest.json").read_text())["items"] == manifest_a["items"]
    assert not (tmp_path / "b.partial").exists()


def test_manifest_and_loader(calib_dir):
    data = CalibrationSet.open(calib_dir)
    assert len(data) == 8 and data.manifest["seed"] == 0
    assert all(len(it["source_sha256"]) == 64 for it in data.manifest["items"])
    batches = data.batches(32, 3)
    assert [b.shape[0] for b in batches] == [3, 3, 2] and batches[0].shape[-1] == 32
    assert batches[0].min() >= -1 and batches[0].max() <= 1


def test_not_a_calibration_set(tmp_path):
    with pytest.raises(InputError, match="manifest"):
        CalibrationSet.open(tmp_path)
