"""Face metrics on dlib's models: identity angle (``identity_deg``) and landmark distance (``lmd``).

Models come from PyPI packages that carry them, nothing is downloaded:

* ``dlib-bin`` — dlib's compiled Python module (HOG frontal face detector, shape predictor,
  face-recognition network; Boost Software License).
* ``face-recognition-models`` — the model files: ``dlib_face_recognition_resnet_model_v1.dat``
  (128-D ResNet embedding, LFW 99.38 %), ``shape_predictor_5_face_landmarks.dat`` and
  ``shape_predictor_68_face_landmarks.dat``. The package is CC0, but the 68-point predictor was
  trained on the iBUG 300-W data set, whose licence excludes commercial use: ``lmd`` is for research
  evaluation only. The package's own ``__init__`` needs ``pkg_resources`` (gone from setuptools ≥ 81),
  so the files are located without importing it.

Face box: dlib's HOG frontal detector on the *reference* image (no upsampling, then 1× upsampling;
the largest box). When it finds no face, the whole image is the box — the inputs are aligned face
crops. The same box is used for the output, so detection noise on a degraded output cannot move the
metric; landmarks are then fitted on each image separately inside that box.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from toolchain.errors import MissingWeightsError

RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
LANDMARKS5_FILE = "shape_predictor_5_face_landmarks.dat"
LANDMARKS68_FILE = "shape_predictor_68_face_landmarks.dat"
_INSTALL = "pip install 'dlib-bin==20.0.1' 'face-recognition-models==0.3.0'"


def _dlib():
    try:
        import dlib
    except ImportError as exc:
        raise MissingWeightsError(f"face metrics need the package dlib-bin (dlib's Python module); {_INSTALL}") from exc
    return dlib


def model_file(filename: str) -> Path:
    """Path of one model file inside the installed ``face-recognition-models`` package (not imported).

    Raises MissingWeightsError naming the package and file when it is absent."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(f"face metrics need weights file {filename} from the package face-recognition-models; {_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / filename
    if not path.is_file():
        raise MissingWeightsError(f"face metrics need weights file {filename}; it is not in {path.parent} ({_INSTALL})")
    return path


def check_available(metric: str) -> None:
    """Raise MissingWeightsError unless dlib and the model files ``metric`` needs are installed."""
    _dlib()
    for f in {"identity_deg": (LANDMARKS5_FILE, RECOGNITION_FILE), "lmd": (LANDMARKS68_FILE,)}[metric]:
        model_file(f)


@lru_cache(maxsize=1)
def _detector():
    return _dlib().get_frontal_face_detector()


@lru_cache(maxsize=2)
def _predictor(filename: str):
    return _dlib().shape_predictor(str(model_file(filename)))


@lru_cache(maxsize=1)
def _recognizer():
    return _dlib().face_recognition_model_v1(str(model_file(RECOGNITION_FILE)))


def to_uint8(images) -> list[np.ndarray]:
    """NCHW tensor in [0, 1] (C = 3 RGB or 1 grey) → list of contiguous (H, W, 3) uint8 RGB arrays (rounded)."""
    import torch

    x = images.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    return [np.ascontiguousarray(im.transpose(1, 2, 0)) for im in x]


def detect_face(img: np.ndarray):
    """dlib.rectangle of the largest face dlib's HOG frontal detector finds in an (H, W, 3) uint8 image
    (upsample 0, then 1), or None when it finds none (its window is 80×80 px, so faces below ~40 px
    are never found)."""
    for upsample in (0, 1):
        dets = list(_detector()(img, upsample))
        if dets:
            return max(dets, key=lambda r: r.width() * r.height())
    return None


def face_box(img: np.ndarray):
    """dlib.rectangle of the face in an (H, W, 3) uint8 image: ``detect_face``, or the whole image when
    no face is found (the inputs are aligned face crops)."""
    box = detect_face(img)
    return box if box is not None else _dlib().rectangle(0, 0, img.shape[1] - 1, img.shape[0] - 1)


def faces_found(ref) -> list[bool]:
    """Per image of ``ref`` (NCHW tensor in [0, 1]): whether the detector found a face, i.e. whether
    ``identity_deg``/``lmd`` measured a detected face rather than the whole-crop fallback box."""
    return [detect_face(r) is not None for r in to_uint8(ref)]


def landmarks(img: np.ndarray, box, filename: str = LANDMARKS68_FILE) -> np.ndarray:
    """Landmarks of the face in ``box``: (K, 2) float64 (x, y) pixel coordinates, K = 68 or 5."""
    shape = _predictor(filename)(img, box)
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def embedding(img: np.ndarray, box) -> np.ndarray:
    """dlib's 128-D face descriptor (float64) of the face in ``box``, aligned with the 5-point predictor
    (dlib's recommended pairing: a 150×150 chip, padding 0.25)."""
    shape = _predictor(LANDMARKS5_FILE)(img, box)
    return np.asarray(_recognizer().compute_face_descriptor(img, shape), dtype=np.float64)


def identity_deg(pred, ref):
    """Angle in degrees (0–180) between dlib 128-D face embeddings of ``pred`` and ``ref``, per image.

    ``pred``, ``ref``: NCHW tensors in [0, 1], same shape. Face box from ``ref`` (see module doc).
    Returns a float32 tensor (N,). Not comparable with the paper's "Deg." (ArcFace embeddings):
    dlib's embedding is trained for a 0.6 L2 same-person threshold, not for angles."""
    import torch

    out = []
    for p, r in zip(to_uint8(pred), to_uint8(ref)):
        box = face_box(r)
        a, b = embedding(p, box), embedding(r, box)
        cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
        out.append(float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))))
    return torch.tensor(out, dtype=torch.float32)


def lmd(pred, ref):
    """Landmark distance: mean Euclidean distance in pixels (at the images' own resolution) between dlib's
    68 landmarks of ``pred`` and of ``ref``, per image.

    ``pred``, ``ref``: NCHW tensors in [0, 1], same shape. Face box from ``ref``. Returns float32 (N,).
    Not normalised by face size: divide by the image side to compare across resolutions."""
    import torch

    out = []
    for p, r in zip(to_uint8(pred), to_uint8(ref)):
        box = face_box(r)
        out.append(float(np.linalg.norm(landmarks(p, box) - landmarks(r, box), axis=1).mean()))
    return torch.tensor(out, dtype=torch.float32)
