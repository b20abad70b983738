"""NIQE — Natural Image Quality Evaluator (Mittal, Soundararajan & Bovik, IEEE SPL 20(3), 2013).

A no-reference score: the distance between a multivariate Gaussian (MVG) fitted to natural-scene
statistics of the test image's 96×96 patches and the MVG of pristine natural images. Lower is
more natural. Follows the authors' MATLAB release (``niqe_release``: ``computequality.m``,
``computefeature.m``, ``estimateaggdparam.m``) step by step:

1. grey image, 0–255 integers (MATLAB ``rgb2gray`` of the 8-bit image);
2. crop to whole 96×96 patches (no overlap); patch sharpness selection is *not* used at test time;
3. at two scales (full, then ½ by bicubic with antialiasing): MSCN coefficients
   ``(I − μ) / (σ + 1)`` with a 7×7 Gaussian window (σ = 7/6, replicate border);
4. per patch 18 features: AGGD fit of the MSCN (α, (β_l + β_r)/2) and, for the products with the
   neighbour at shifts (0,1), (1,0), (1,1), (1,−1) (circular within the patch), AGGD α, mean, β_l, β_r;
5. MVG of the 36-D patch features (NaN-rows dropped), and
   ``sqrt((μ_p − μ)ᵀ pinv((Σ_p + Σ)/2) (μ_p − μ))``.

The pristine μ_p (36) and Σ_p (36×36) are the published ones: ``toolchain/weights/niqe_pris_params.npz``
is the file BasicSR ships (``basicsr/metrics/niqe_pris_params.npz``, Apache-2.0), converted from
``modelparameters.mat`` of the MATLAB release; see NOTICE.

One deviation, stated: an image with a single 96×96 patch (96–191 px) has no patch covariance, so Σ
is taken as 0 there and the score is the Mahalanobis distance under Σ_p/2 (NIQE is meant for ≥ 2×2
patches, i.e. ≥ 192 px; such scores are not comparable with published NIQE).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.special import gamma

PATCH = 96
PARAMS_FILE = Path(__file__).resolve().parents[1] / "weights" / "niqe_pris_params.npz"
_GAM = np.arange(0.2, 10.0 + 5e-4, 0.001)  # MATLAB: gam = 0.2:0.001:10
_R_GAM = gamma(2.0 / _GAM) ** 2 / (gamma(1.0 / _GAM) * gamma(3.0 / _GAM))
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))


@lru_cache(maxsize=1)
def pristine_params() -> tuple[np.ndarray, np.ndarray]:
    """The published pristine MVG: (mu (36,) float64, cov (36, 36) float64).

    Raises MissingWeightsError when the bundled ``niqe_pris_params.npz`` is absent."""
    from toolchain.errors import MissingWeightsError

    if not PARAMS_FILE.is_file():
        raise MissingWeightsError(f"metric 'niqe' needs weights file {PARAMS_FILE.name} (expected at {PARAMS_FILE}; "
                                  "it ships with the toolchain — reinstall it)")
    with np.load(PARAMS_FILE, allow_pickle=False) as f:
        return f["mu_pris_param"].reshape(-1).astype(np.float64), f["cov_pris_param"].astype(np.float64)


def gaussian_window(size: int = 7, sigma: float = 7.0 / 6.0) -> np.ndarray:
    """MATLAB ``fspecial('gaussian', size, sigma)``: (size, size) float64 summing to 1."""
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(ax**2) / (2 * sigma**2))
    w = np.outer(g, g)
    return w / w.sum()


def mscn(img: np.ndarray, window: np.ndarray | None = None) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients of a grey image.

    ``img``: (H, W) float, 0–255 scale. Returns (H, W) float64 ``(I − μ) / (σ + 1)`` with μ, σ the
    local Gaussian-weighted mean and standard deviation (replicate border, as MATLAB ``imfilter(..., 'replicate')``)."""
    w = gaussian_window() if window is None else window
    x = np.asarray(img, dtype=np.float64)
    mu = ndimage.correlate(x, w, mode="nearest")
    sigma = np.sqrt(np.abs(ndimage.correlate(x * x, w, mode="nearest") - mu * mu))
    return (x - mu) / (sigma + 1.0)


def aggd_fit(values: np.ndarray) -> tuple[float, float, float]:
    """Moment-matching fit of an asymmetric generalised Gaussian (Lasmar et al. 2009), as ``estimateaggdparam.m``.

    ``values``: any-shape float array. Returns (alpha, beta_left, beta_right): shape α searched on the
    grid 0.2:0.001:10, scales β = std_side · sqrt(Γ(1/α)/Γ(3/α)). NaN when a side has no values."""
    v = np.asarray(values, dtype=np.float64).ravel()
    neg, pos = v[v < 0], v[v > 0]
    if neg.size == 0 or pos.size == 0:
        return float("nan"), float("nan"), float("nan")
    left_std, right_std = np.sqrt(np.mean(neg**2)), np.sqrt(np.mean(pos**2))
    gammahat = left_std / right_std
    rhat = np.mean(np.abs(v)) ** 2 / np.mean(v**2)
    rhatnorm = rhat * (gammahat**3 + 1) * (gammahat + 1) / (gammahat**2 + 1) ** 2
    alpha = float(_GAM[np.argmin((_R_GAM - rhatnorm) ** 2)])
    k = np.sqrt(gamma(1.0 / alpha) / gamma(3.0 / alpha))
    return alpha, float(left_std * k), float(right_std * k)


def patch_features(mscn_patch: np.ndarray) -> np.ndarray:
    """The 18 NIQE features of one MSCN patch (``computefeature.m``), float64 (18,)."""
    alpha, bl, br = aggd_fit(mscn_patch)
    feat = [alpha, (bl + br) / 2]
    for shift in _SHIFTS:
        pair = mscn_patch * np.roll(mscn_patch, shift, axis=(0, 1))  # MATLAB circshift(structdis, shift)
        a, l, r = aggd_fit(pair)
        mean = (r - l) * gamma(2.0 / a) / gamma(1.0 / a)
        feat += [a, mean, l, r]
    return np.asarray(feat, dtype=np.float64)


def _cubic(x: np.ndarray) -> np.ndarray:
    """MATLAB ``imresize``'s bicubic kernel (Keys, a = −0.5)."""
    ax = np.abs(x)
    return ((1.5 * ax**3 - 2.5 * ax**2 + 1) * (ax <= 1)
            + (-0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def half_scale(img: np.ndarray) -> np.ndarray:
    """MATLAB ``imresize(img, 0.5)`` (bicubic, antialiasing on) of an (H, W) image with even H and W → (H/2, W/2) float64.

    At scale ½ MATLAB's kernel is the cubic stretched ×2: 8 taps at distances ±0.5…±3.5 from the output
    pixel's centre (input coordinate 2i + 0.5, 0-based), weights 0.5·cubic(0.5·d) normalised to 1, and the
    image mirrored at its borders (``symmetric``)."""
    d = np.arange(-3.5, 4.0, 1.0)
    taps = _cubic(0.5 * d)
    taps = taps / taps.sum()
    out = np.asarray(img, dtype=np.float64)
    for axis in (0, 1):
        n = out.shape[axis]
        pad = [(0, 0), (0, 0)]
        pad[axis] = (4, 4)
        x = np.pad(out, pad, mode="symmetric")
        # output i draws input 2i−3 … 2i+4, i.e. padded 2i+1 … 2i+8
        acc = sum(w * np.take(x, np.arange(k + 1, k + 1 + n - 1, 2), axis=axis) for k, w in enumerate(taps))
        out = acc
    return out


def image_features(gray: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """36-D features of every whole ``patch``×``patch`` patch of a grey image (0–255): (n_patches, 36) float64."""
    h, w = gray.shape
    nh, nw = h // patch, w // patch
    img = np.asarray(gray, dtype=np.float64)[: nh * patch, : nw * patch]
    feats = []
    for scale in (1, 2):
        m = mscn(img)
        p = patch // scale
        feats.append(np.stack([patch_features(m[i * p : (i + 1) * p, j * p : (j + 1) * p]) for i in range(nh) for j in range(nw)]))
        if scale == 1:
            img = half_scale(img)
    return np.concatenate(feats, axis=1)


def niqe_gray(gray: np.ndarray) -> float:
    """NIQE of one grey image (H, W) on the 0–255 scale, H and W ≥ 96. Lower = more natural; unitless."""
    gray = np.asarray(gray)
    if gray.ndim != 2 or min(gray.shape) < PATCH:
        raise ValueError(f"NIQE needs a 2-D image of at least {PATCH}×{PATCH} px, got shape {gray.shape}")
    mu_p, cov_p = pristine_params()
    feats = image_features(gray)
    mu = np.nanmean(feats, axis=0)
    clean = feats[~np.isnan(feats).any(axis=1)]
    cov = np.cov(clean, rowvar=False) if len(clean) >= 2 else np.zeros_like(cov_p)
    d = mu_p - mu
    return float(np.sqrt(d @ np.linalg.pinv((cov_p + cov) / 2) @ d))


def rgb_to_gray_uint8(rgb01: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2gray`` of the 8-bit image: (H, W, 3) floats in [0, 1] → (H, W) uint8.

    The image is first rounded to 8 bits, as a saved PNG would be; Y = 0.2989 R + 0.5870 G + 0.1140 B, rounded."""
    u8 = np.clip(np.round(np.asarray(rgb01, dtype=np.float64) * 255.0), 0, 255)
    y = u8 @ np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])  # MATLAB's exact coefficients
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def niqe(images) -> "torch.Tensor":  # noqa: F821
    """NIQE per image. ``images``: NCHW tensor (C = 3 RGB or 1 grey) in [0, 1], H and W ≥ 96.

    Returns a float32 tensor (N,) of NIQE scores (unitless, lower = more natural; the MATLAB
    release gives roughly 3–6 for natural photographs, more for blurred or noisy ones)."""
    import torch

    x = images.detach().float().cpu().clamp(0, 1).numpy()
    out = []
    for img in x:
        if img.shape[0] == 3:
            g = rgb_to_gray_uint8(img.transpose(1, 2, 0))
        else:
            g = np.clip(np.round(img[0] * 255.0), 0, 255).astype(np.uint8)
        out.append(niqe_gray(g))
    return torch.tensor(out, dtype=torch.float32)
