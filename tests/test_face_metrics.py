"""identity_deg, lmd and niqe: each against an independent computation.

identity_deg / lmd: dlib called directly here (files found through the installed distribution's record,
not through toolchain.eval.face) and the angle / distance written out with math. NIQE: the AGGD fit
recovers the parameters of samples drawn from a known AGGD, the MSCN equals a plain loop over the
window, the ½-scale resize equals Pillow's antialiased bicubic away from the border, and blur or noise
raise the score of a real photograph.
"""

from __future__ import annotations

import math
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FACES = Path(__file__).resolve().parents[1] / "toolchain" / "calibration" / "faces"


def _face(name: str, size: int = 256) -> torch.Tensor:
    img = Image.open(FACES / name).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def _blur(x: torch.Tensor, k: int = 5) -> torch.Tensor:
    p = k // 2
    return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (p, p, p, p), mode="replicate"), k, 1)


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    return torch.stack([_face(n) for n in sorted(p.name for p in FACES.glob("*.png"))])


def _model_path(filename: str) -> str:
    """The model file as the face-recognition-models distribution records it."""
    dist = metadata.distribution("face-recognition-models")
    (rel,) = [f for f in dist.files if f.name == filename]
    return str(dist.locate_file(rel))


def _u8(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def _box(dlib, img: np.ndarray):
    det = dlib.get_frontal_face_detector()
    dets = list(det(img, 0)) or list(det(img, 1))
    if not dets:
        return dlib.rectangle(0, 0, img.shape[1] - 1, img.shape[0] - 1)
    return max(dets, key=lambda r: r.area())


def test_identity_deg_matches_dlib_descriptors_and_a_plain_angle(faces):
    dlib = pytest.importorskip("dlib")
    from toolchain.eval.metrics import paired_metric

    sp = dlib.shape_predictor(_model_path("shape_predictor_5_face_landmarks.dat"))
    rec = dlib.face_recognition_model_v1(_model_path("dlib_face_recognition_resnet_model_v1.dat"))
    blurred = _blur(faces)
    other = faces.roll(1, dims=0)
    metric = paired_metric("identity_deg")
    for pred in (blurred, other):
        got = metric(pred, faces)
        assert got.shape == (len(faces),) and got.dtype == torch.float32
        for i in range(len(faces)):
            r, p = _u8(faces[i]), _u8(pred[i])
            box = _box(dlib, r)
            a = list(rec.compute_face_descriptor(p, sp(p, box)))
            b = list(rec.compute_face_descriptor(r, sp(r, box)))
            dot = sum(x * y for x, y in zip(a, b))
            angle = math.degrees(math.acos(max(-1.0, min(1.0, dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))))))
            assert got[i].item() == pytest.approx(angle, abs=1e-3)
    assert metric(faces, faces).abs().max() < 1e-3  # same image: same embedding
    assert metric(blurred, faces).mean() < metric(other, faces).mean()  # a blur keeps the person, another face does not


def test_lmd_matches_dlib_68_points_and_follows_a_translation(faces):
    dlib = pytest.importorskip("dlib")
    from toolchain.eval.metrics import paired_metric

    sp = dlib.shape_predictor(_model_path("shape_predictor_68_face_landmarks.dat"))
    metric = paired_metric("lmd")
    noisy = (faces + 0.05 * torch.randn(faces.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    got = metric(noisy, faces)
    for i in range(len(faces)):
        r, p = _u8(faces[i]), _u8(noisy[i])
        box = _box(dlib, r)
        pts_p = [(q.x, q.y) for q in sp(p, box).parts()]
        pts_r = [(q.x, q.y) for q in sp(r, box).parts()]
        assert len(pts_p) == 68
        mean = sum(math.hypot(a[0] - b[0], a[1] - b[1]) for a, b in zip(pts_p, pts_r)) / 68
        assert got[i].item() == pytest.approx(mean, abs=1e-4)
    assert metric(faces, faces).abs().max() == 0
    # the face moved right by 6 px inside the same box: the landmarks follow it, in pixels
    shifted = torch.nn.functional.pad(faces, (6, 0, 0, 0), mode="replicate")[..., :-6]
    moved = metric(shifted, faces)
    assert (moved > 3).all() and (moved < 9).all()


def test_face_metrics_name_the_package_to_install_when_missing(monkeypatch):
    import importlib.util
    import sys

    from toolchain.errors import MissingWeightsError
    from toolchain.eval import face
    from toolchain.eval.evaluate import resolve_metrics

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "face_recognition_models" else real(name, *a))
    with pytest.raises(MissingWeightsError, match="face-recognition-models"):
        face.check_available("lmd")
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib → ImportError
    usable, skipped = resolve_metrics(["psnr", "identity_deg", "lmd"], None)
    assert usable == ["psnr"] and all("dlib-bin" in skipped[m] for m in ("identity_deg", "lmd"))


# ---- NIQE -----------------------------------------------------------------------------------------


def test_aggd_fit_recovers_known_parameters():
    """Samples of an AGGD with shape α and side scales β_l, β_r: |generalised normal| scaled by the side's β,
    the side negative with probability β_l / (β_l + β_r) (Lasmar et al.'s density has that mass on each side)."""
    from scipy.stats import gennorm

    from toolchain.eval.niqe import aggd_fit

    rng = np.random.default_rng(0)
    for alpha, bl, br in ((2.0, 1.0, 1.0), (0.8, 0.5, 1.5), (1.4, 2.0, 0.7)):
        z = np.abs(gennorm.rvs(alpha, size=400_000, random_state=rng))
        x = np.where(rng.random(z.size) < bl / (bl + br), -z * bl, z * br)
        a, l, r = aggd_fit(x)
        assert a == pytest.approx(alpha, rel=0.03) and l == pytest.approx(bl, rel=0.03) and r == pytest.approx(br, rel=0.03)


def test_mscn_equals_a_plain_window_loop():
    from toolchain.eval.niqe import gaussian_window, mscn

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(20, 17)).astype(np.float64)
    w = gaussian_window()
    assert w.shape == (7, 7) and w.sum() == pytest.approx(1.0)
    pad = np.pad(img, 3, mode="edge")  # MATLAB imfilter(..., 'replicate')
    mu = np.zeros_like(img)
    m2 = np.zeros_like(img)
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            win = pad[i : i + 7, j : j + 7]
            mu[i, j] = (win * w).sum()
            m2[i, j] = (win * win * w).sum()
    plain = (img - mu) / (np.sqrt(np.abs(m2 - mu * mu)) + 1)
    assert np.allclose(mscn(img), plain, atol=1e-10)


def test_pristine_params_are_the_published_model():
    from toolchain.eval.niqe import PARAMS_FILE, gaussian_window, pristine_params

    mu, cov = pristine_params()
    assert mu.shape == (36,) and cov.shape == (36, 36) and np.allclose(cov, cov.T)
    assert np.linalg.eigvalsh(cov).min() > 0
    with np.load(PARAMS_FILE) as f:  # the release's window is fspecial('gaussian', 7, 7/6)
        assert np.allclose(f["gaussian_window"], gaussian_window(), atol=1e-12)


def test_half_scale_is_antialiased_bicubic():
    """Pillow's bicubic (the same a = −0.5 kernel, stretched ×2 when halving) agrees away from the border."""
    from toolchain.eval.niqe import half_scale

    img = np.asarray(Image.open(FACES / "astronaut_eileen_collins.png").convert("L"), dtype=np.float64)
    ours = half_scale(img)
    pil = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((img.shape[1] // 2, img.shape[0] // 2),
                                                                             Image.Resampling.BICUBIC), dtype=np.float64)
    assert ours.shape == pil.shape
    assert np.abs(ours - pil)[2:-2, 2:-2].max() < 1e-3


def test_niqe_rises_with_blur_and_noise():
    """On the sharp, clean astronaut portrait (the Solvay crops are already degraded photographs)."""
    from toolchain.eval.metrics import paired_metric

    niqe = paired_metric("niqe")
    faces = _face("astronaut_eileen_collins.png")[None]
    clean = niqe(faces, faces)
    noisy = (faces + 0.08 * torch.randn(faces.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert torch.isfinite(clean).all() and clean.shape == (len(faces),)
    assert (niqe(_blur(faces, 7), faces) > clean).all()
    assert (niqe(noisy, faces) > clean).all()
    assert torch.equal(niqe(faces, noisy), clean)  # no reference: the second argument is not used


def test_eval_skips_niqe_below_its_patch_size():
    from toolchain.eval.evaluate import resolve_metrics

    usable, skipped = resolve_metrics(["psnr", "niqe"], None, image_size=64)
    assert usable == ["psnr"] and "96" in skipped["niqe"]
    assert resolve_metrics(["niqe"], None, image_size=128)[0] == ["niqe"]


def test_eval_reports_face_metrics_and_explains_a_skipped_niqe(tiny_model_path, calib_dir, tmp_path, capsys):
    """`toolchain eval` with the new names: identity and landmarks scored per image, NIQE skipped on 64 px images."""
    import json

    from toolchain.cli import main

    assert main(["eval", "--data", str(calib_dir), "--model", str(tiny_model_path), "--out", str(tmp_path / "ev"), "--limit", "2",
                 "--metrics", "psnr,identity_deg,lmd,niqe", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["metrics"] == ["psnr", "identity_deg", "lmd"] and "96" in report["skipped_metrics"]["niqe"]
    assert "warning: metric niqe skipped" in capsys.readouterr().err
    for row in report["results"].values():
        hq = row["vs_hq"]
        assert len(hq["identity_deg_per_image"]) == 2 and 0 <= hq["identity_deg"] <= 180 and hq["lmd"] >= 0
    assert "ArcFace" in report["metric_notes"]["identity_deg"]
