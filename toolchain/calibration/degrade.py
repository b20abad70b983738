"""Second-order face degradation (blur → downsample → noise → JPEG, applied twice).

The same recipe family as Real-ESRGAN / WaveFace training data, with every random choice
drawn from a generator seeded by (seed, image index): an image's degradation depends only on
those two numbers, never on the order images are processed, so sets are reproducible and a
build can resume mid-way.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class StageRanges:
    blur_sigma: tuple[float, float]
    blur_prob: float
    scale: tuple[float, float]  # downsample factor (output/input)
    noise_sigma: tuple[float, float]  # in 0..255 units
    noise_prob: float
    gray_noise_prob: float
    jpeg_quality: tuple[int, int]


@dataclass
class DegradationConfig:
    stage1: StageRanges = field(default_factory=lambda: StageRanges((0.2, 3.0), 1.0, (0.25, 0.8), (1.0, 20.0), 0.8, 0.4, (40, 95)))
    stage2: StageRanges = field(default_factory=lambda: StageRanges((0.2, 1.5), 0.8, (0.5, 1.0), (1.0, 15.0), 0.6, 0.4, (40, 95)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _gaussian_kernel(sigma_x: float, sigma_y: float, theta: float, size: int) -> np.ndarray:
    ax = np.arange(size) - size // 2
    xx, yy = np.meshgrid(ax, ax)
    c, s = math.cos(theta), math.sin(theta)
    xr, yr = c * xx + s * yy, -s * xx + c * yy
    k = np.exp(-0.5 * ((xr / sigma_x) ** 2 + (yr / sigma_y) ** 2))
    return (k / k.sum()).astype(np.float32)


def _blur(img: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    k = torch.from_numpy(kernel)[None, None].repeat(3, 1, 1, 1)
    pad = kernel.shape[0] // 2
    x = F.pad(img[None], (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(x, k, groups=3)[0]


def _resize(img: torch.Tensor, h: int, w: int, mode: str) -> torch.Tensor:
    kwargs = {"antialias": True} if mode in ("bilinear", "bicubic") else {}
    if mode != "area":
        kwargs["align_corners"] = False
    return F.interpolate(img[None], size=(h, w), mode=mode, **kwargs)[0]


def _jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    out = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(out).permute(2, 0, 1).contiguous()


def _stage(img: torch.Tensor, r: StageRanges, rng: np.random.Generator, out_hw: tuple[int, int]) -> tuple[torch.Tensor, dict]:
    p: dict[str, Any] = {}
    if rng.random() < r.blur_prob:
        sx = float(rng.uniform(*r.blur_sigma))
        sy = float(rng.uniform(*r.blur_sigma)) if rng.random() < 0.5 else sx
        theta = float(rng.uniform(0, math.pi))
        size = int(2 * math.ceil(3 * max(sx, sy)) + 1)
        size = max(3, min(size, 2 * (min(img.shape[1:]) // 2) - 1))
        img = _blur(img, _gaussian_kernel(sx, sy, theta, size))
        p["blur"] = {"sigma_x": sx, "sigma_y": sy, "theta": theta, "kernel": size}
    scale = float(rng.uniform(*r.scale))
    mode = str(rng.choice(["area", "bilinear", "bicubic"]))
    h, w = max(8, round(out_hw[0] * scale)), max(8, round(out_hw[1] * scale))
    img = _resize(img, h, w, mode).clamp(0, 1)
    p["resize"] = {"scale": scale, "mode": mode, "size": [h, w]}
    if rng.random() < r.noise_prob:
        sigma = float(rng.uniform(*r.noise_sigma)) / 255.0
        gray = bool(rng.random() < r.gray_noise_prob)
        shape = (1, h, w) if gray else (3, h, w)
        noise = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) * sigma
        img = (img + noise).clamp(0, 1)
        p["noise"] = {"sigma": sigma * 255.0, "gray": gray}
    q = int(rng.integers(r.jpeg_quality[0], r.jpeg_quality[1] + 1))
    img = _jpeg(img, q)
    p["jpeg"] = q
    return img, p


def degrade(hq: np.ndarray, seed: int, index: int, config: DegradationConfig | None = None) -> tuple[np.ndarray, dict]:
    """Degrade an HQ RGB image (H, W, 3) float in [0, 1]; returns (LQ same size, parameters)."""
    config = config or DegradationConfig()
    rng = np.random.default_rng([seed, index])
    hw = hq.shape[:2]
    img = torch.from_numpy(np.ascontiguousarray(hq, dtype=np.float32)).permute(2, 0, 1)
    img, p1 = _stage(img, config.stage1, rng, hw)
    img, p2 = _stage(img, config.stage2, rng, (img.shape[1], img.shape[2]))
    img = _resize(img, hw[0], hw[1], "bicubic").clamp(0, 1)
    return img.permute(1, 2, 0).numpy(), {"stage1": p1, "stage2": p2}
