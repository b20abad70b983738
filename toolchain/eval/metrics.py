"""Image quality metrics, all offline.

Inputs are NCHW tensors in [0, 1]; every metric returns one value per image.

* ``psnr``, ``ssim``      – computed here.
* ``st_lpips``            – shift-tolerant LPIPS (AlexNet), weights shipped inside the
                            ``stlpips-pytorch`` wheel. A real learned perceptual metric, but its
                            numbers are not comparable to published LPIPS; reported as "ST-LPIPS".
* ``lpips``               – standard LPIPS-Alex; needs torchvision's ImageNet AlexNet weights
                            (``alexnet-owt-7be5be79.pth``) in ``--weights-dir``.
* ``fid``                 – set-level Fréchet distance of Inception-v3 pool features; needs
                            ``inception_v3_google-0cc3c7bd.pth`` in ``--weights-dir``.
* ``fd_stlpips``          – labelled FID substitute: Fréchet distance of ST-LPIPS AlexNet features
                            (never to be compared with published FID).
* ``identity_deg``        – angle (degrees) between dlib 128-D face embeddings of output and reference
                            (``toolchain.eval.face``; packages ``dlib-bin`` + ``face-recognition-models``).
                            The paper's "Deg." uses ArcFace: not comparable.
* ``lmd``                 – mean distance (pixels) between dlib 68-point landmarks of output and reference.
* ``niqe``                – no-reference NIQE with the published pristine parameters
                            (``toolchain.eval.niqe``); computed on the output alone.

Missing weights raise MissingWeightsError naming the file; nothing is downloaded.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from toolchain.errors import MissingWeightsError

LPIPS_ALEX_FILE = "alexnet-owt-7be5be79.pth"
INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"


def psnr_from_mse(mse: float, data_range: float = 1.0) -> float:
    """PSNR in dB of a mean squared error for signals spanning ``data_range`` (1.0 for [0, 1], 2.0 for [-1, 1]);
    ``inf`` for mse == 0. The one PSNR formula of the toolchain (``psnr`` below applies it per image)."""
    import math

    return math.inf if mse <= 0 else 10.0 * math.log10(data_range * data_range / mse)


def psnr(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    mse = (pred.float() - ref.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp(min=1e-12))


def _gauss_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004) with an 11×11 Gaussian window, averaged over RGB channels."""
    c1, c2 = 0.01**2, 0.03**2
    x, y = pred.float(), ref.float()
    ch = x.shape[1]
    w = _gauss_window().to(x.device)[None, None].repeat(ch, 1, 1, 1)
    mu_x, mu_y = F.conv2d(x, w, groups=ch), F.conv2d(y, w, groups=ch)
    sxx = F.conv2d(x * x, w, groups=ch) - mu_x**2
    syy = F.conv2d(y * y, w, groups=ch) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=ch) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def _import_stlpips():
    """Import stlpips-pytorch's module.

    It imports IPython (``embed``) and torchsummary (``summary``) at module level but never
    calls them on the shift-tolerant path; placeholders stand in when they are not installed so
    the metric does not pull an interactive shell into the dependency set.
    """
    import importlib.util
    import sys
    import types

    placeholders = []
    for mod, attr in (("IPython", "embed"), ("torchsummary", "summary")):
        if mod not in sys.modules and importlib.util.find_spec(mod) is None:
            placeholder = types.ModuleType(mod)
            setattr(placeholder, attr, None)
            sys.modules[mod] = placeholder
            placeholders.append(mod)
    try:
        from stlpips_pytorch import stlpips
    finally:  # other libraries (matplotlib) probe sys.modules["IPython"]; do not leave a fake one
        for mod in placeholders:
            sys.modules.pop(mod, None)
    return stlpips


@lru_cache(maxsize=2)
def stlpips_net(net: str = "alex") -> torch.nn.Module:
    """The shift-tolerant LPIPS network with the weights bundled in its wheel."""
    stlpips = _import_stlpips()

    model = stlpips.LPIPS(net=net, variant="shift_tolerant", verbose=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def st_lpips(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    net = stlpips_net().to(pred.device)
    return net(pred.float() * 2 - 1, ref.float() * 2 - 1).flatten()


def _require(weights_dir: str | Path | None, filename: str, metric: str) -> Path:
    if weights_dir is None:
        raise MissingWeightsError(f"metric '{metric}' needs {filename}; pass --weights-dir DIR containing it (nothing is downloaded)")
    path = Path(weights_dir) / filename
    if not path.is_file():
        raise MissingWeightsError(f"metric '{metric}' needs {path} (file {filename}); it is not there and will not be downloaded")
    return path


@lru_cache(maxsize=2)
def _lpips_alex(weights_dir: str) -> torch.nn.Module:
    import lpips

    from toolchain.io.weights import load_tensors

    path = _require(weights_dir, LPIPS_ALEX_FILE, "lpips")
    model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    alex = {k[len("features.") :]: v for k, v in load_tensors(path).items() if k.startswith("features.")}
    slices = [model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5]
    for sl in slices:
        for idx, layer in sl.named_children():
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.data.copy_(alex[f"{idx}.weight"])
                layer.bias.data.copy_(alex[f"{idx}.bias"])
    return model.eval()


def make_lpips(weights_dir: str | Path | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    _require(weights_dir, LPIPS_ALEX_FILE, "lpips")

    def fn(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        net = _lpips_alex(str(weights_dir)).to(pred.device)
        with torch.no_grad():
            return net(pred.float() * 2 - 1, ref.float() * 2 - 1).flatten()

    return fn


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D)."""
    from scipy import linalg

    mu1, mu2 = feats_a.mean(0), feats_b.mean(0)
    s1 = np.cov(feats_a, rowvar=False) if len(feats_a) > 1 else np.zeros((feats_a.shape[1],) * 2)
    s2 = np.cov(feats_b, rowvar=False) if len(feats_b) > 1 else np.zeros((feats_b.shape[1],) * 2)
    with warnings.catch_warnings():  # few images → singular covariances; handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off).dot(s2 + off))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def stlpips_features(images: torch.Tensor) -> np.ndarray:
    """Global-average-pooled last AlexNet stage of the ST-LPIPS network (for fd_stlpips)."""
    net = stlpips_net().to(images.device)
    with torch.no_grad():
        feats = net.net.forward(net.scaling_layer(images.float() * 2 - 1))
    return feats[-1].mean(dim=(2, 3)).cpu().double().numpy()


@lru_cache(maxsize=1)
def _inception(weights_dir: str) -> torch.nn.Module:
    from torchvision.models import inception_v3

    from toolchain.io.weights import load_tensors

    path = _require(weights_dir, INCEPTION_FILE, "fid")
    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    net.load_state_dict(load_tensors(path))
    net.fc = torch.nn.Identity()
    return net.eval()


def inception_features(images: torch.Tensor, weights_dir: str | Path | None) -> np.ndarray:
    _require(weights_dir, INCEPTION_FILE, "fid")
    net = _inception(str(weights_dir))
    x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        return net((x - mean) / std).double().numpy()


PAIRED_METRICS = ("psnr", "ssim", "st_lpips", "lpips", "identity_deg", "lmd", "niqe")
SET_METRICS = ("fid", "fd_stlpips")
# Paired in form (pred, ref) but computed on pred alone: the same value against HQ and against FP.
NO_REFERENCE_METRICS = ("niqe",)
DEFAULT_METRICS = ("psnr", "ssim", "st_lpips", "fd_stlpips")
LOWER_IS_BETTER = {"st_lpips", "lpips", "fid", "fd_stlpips", "identity_deg", "lmd", "niqe"}
NIQE_MIN_SIZE = 96  # NIQE's patch side
# What each reported number is, for reports and tables (eval's report.json and compare's JSON).
METRIC_NOTES = {"st_lpips": "shift-tolerant LPIPS (AlexNet); not comparable to published LPIPS",
                "fd_stlpips": "Fréchet distance of ST-LPIPS features; a labelled FID substitute, not FID",
                "identity_deg": "degrees between dlib 128-D face embeddings (not ArcFace: not comparable with the paper's Deg.)",
                "lmd": "mean distance in pixels at the images' resolution between dlib 68-point landmarks",
                "niqe": "no-reference NIQE (published pristine model) of the output alone; vs_hq and vs_fp hold the same value"}


def check_metric_available(name: str, weights_dir: str | Path | None = None) -> None:
    """Raise MissingWeightsError (naming the file or package to install) when ``name`` cannot run here;
    KeyError for a name that is no metric."""
    if name == "lpips":
        make_lpips(weights_dir)
    elif name == "fid":
        _require(weights_dir, INCEPTION_FILE, "fid")
    elif name in ("identity_deg", "lmd"):
        from toolchain.eval import face

        face.check_available(name)
    elif name == "niqe":
        from toolchain.eval.niqe import pristine_params

        pristine_params()
    elif name not in PAIRED_METRICS + SET_METRICS:
        raise KeyError(name)


def paired_metric(name: str, weights_dir: str | Path | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The function ``(pred, ref) -> (N,) tensor`` of a per-image metric; NCHW inputs in [0, 1].

    Raises MissingWeightsError when its weights or packages are absent, KeyError for an unknown name."""
    if name == "psnr":
        return psnr
    if name == "ssim":
        return ssim
    if name == "st_lpips":
        return lambda a, b: st_lpips(a, b).detach()
    if name == "lpips":
        return make_lpips(weights_dir)
    if name in ("identity_deg", "lmd"):
        from toolchain.eval import face

        face.check_available(name)
        return getattr(face, name)
    if name == "niqe":
        from toolchain.eval.niqe import niqe

        return lambda a, b: niqe(a)
    raise KeyError(name)


def set_metric(name: str, pred: torch.Tensor, ref: torch.Tensor, weights_dir: str | Path | None = None) -> float:
    if name == "fd_stlpips":
        return frechet_distance(stlpips_features(pred), stlpips_features(ref))
    if name == "fid":
        return frechet_distance(inception_features(pred, weights_dir), inception_features(ref, weights_dir))
    raise KeyError(name)
