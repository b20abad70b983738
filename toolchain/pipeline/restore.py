"""One-step face restoration of arbitrary images.

Each image is scaled so its longer side equals the model size, reflect-padded to a square,
restored in batches, cropped back and resized to its original size. Grey images come back
grey, RGBA images keep their alpha. All inputs are decoded before any output is written, so a
bad file fails the run before anything is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from toolchain.io.images import LoadedImage, list_images, load_image, save_image


RESTORE_SOFTWARE = "quantface-toolchain restore"  # PNG Software field of every restored image (tells our outputs from the user's)


@dataclass
class Placement:
    """Where the resized image sits inside the padded model input."""

    top: int
    left: int
    height: int
    width: int


def to_model_input(img: LoadedImage, size: int) -> tuple[torch.Tensor, Placement]:
    """Resize (longer side = size) and reflect-pad to size×size; returns (1,3,S,S) in [-1,1]."""
    h, w = img.rgb.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    t = torch.from_numpy(np.ascontiguousarray(img.rgb)).permute(2, 0, 1)[None]
    if (nh, nw) != (h, w):
        t = F.interpolate(t, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (size - nh) // 2, (size - nw) // 2
    pads = (left, size - nw - left, top, size - nh - top)
    if any(pads):
        mode = "reflect" if all(p < d for p, d in zip(pads, (nw, nw, nh, nh))) else "replicate"
        t = F.pad(t, pads, mode=mode)
    return t * 2.0 - 1.0, Placement(top, left, nh, nw)


def from_model_output(out: torch.Tensor, place: Placement, orig_hw: tuple[int, int]) -> np.ndarray:
    """Crop the padded output and resize to the original size; returns (H, W, 3) in [0, 1]."""
    crop = out[:, :, place.top : place.top + place.height, place.left : place.left + place.width]
    crop = (crop.float() + 1.0) / 2.0
    if crop.shape[-2:] != orig_hw:
        crop = F.interpolate(crop, size=orig_hw, mode="bicubic", antialias=True, align_corners=False)
    return crop.clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()


def restore_arrays(model: Callable[[torch.Tensor], torch.Tensor], images: Sequence[LoadedImage], size: int,
                   batch_size: int = 4, device: torch.device | str = "cpu", progress: bool = True) -> list[np.ndarray]:
    """Restore decoded images; returns RGB arrays at each image's original size (times the model's upscale factor)."""
    prepared = [to_model_input(im, size) for im in images]
    results: list[np.ndarray] = []
    bar = tqdm(total=len(images), desc="restoring", disable=not progress, unit="img")
    with torch.no_grad():
        for k in range(0, len(prepared), batch_size):
            chunk = prepared[k : k + batch_size]
            x = torch.cat([c[0] for c in chunk]).to(device)
            y = model(x)
            f = y.shape[-1] // x.shape[-1]  # super-resolution kinds (osediff) return f× the input size
            for j, (_, place) in enumerate(chunk):
                h, w = images[k + j].rgb.shape[:2]
                scaled = Placement(place.top * f, place.left * f, place.height * f, place.width * f)
                results.append(from_model_output(y[j : j + 1], scaled, (h * f, w * f)))
            bar.update(len(chunk))
    bar.close()
    return results


def restore_files(model: Callable[[torch.Tensor], torch.Tensor], inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  size: int, batch_size: int = 4, device: torch.device | str = "cpu", suffix: str = ".png", progress: bool = True) -> list[Path]:
    """Restore image files/directories into ``out_dir``; each output file is written atomically.

    Every input is decoded before anything is written, so one bad file fails the run with nothing
    written. ``out_dir`` is not checked here (``toolchain.io.outputs.check_output_files_into`` does)."""
    paths = list_images(list(inputs))
    images = [load_image(p) for p in paths]  # decode everything first: bad input fails before any write
    restored = restore_arrays(model, images, size, batch_size, device, progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [save_image(out_dir / name, rgb, img.mode, _alpha_at(img.alpha, rgb.shape[:2]), software=RESTORE_SOFTWARE)
            for img, rgb, name in zip(images, restored, output_names(paths, suffix))]


def _alpha_at(alpha: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray | None:
    """The alpha channel resized (bilinear) to an upscaled output's size; unchanged otherwise."""
    if alpha is None or alpha.shape == hw:
        return alpha
    t = F.interpolate(torch.from_numpy(np.ascontiguousarray(alpha))[None, None], size=hw, mode="bilinear", align_corners=False)
    return t[0, 0].clamp(0, 1).numpy()


def output_names(paths: Sequence[Path], suffix: str = ".png") -> list[str]:
    """Output file names for ``paths``: the stem plus ``suffix``, with _1, _2 … for repeated stems."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        base = p.stem
        n = seen.get(base, 0)
        seen[base] = n + 1
        names.append(f"{base}{suffix}" if n == 0 else f"{base}_{n}{suffix}")
    return names
