"""One-step restoration of arbitrary images.

Default ("ours"): each image is scaled so its longer side equals the model size, reflect-padded to a
square, restored in batches, cropped back and resized to its original size (×the model's upscale
factor for OSEDiff). Grey images come back grey, RGBA images keep their alpha.

Upstream mode (``upstream=True``) reproduces each release's own pre/post-processing for parity checks
(UPSTREAM.md "Release layouts"):
  * OSDFace: ``convert('RGB')``; a square image → model size bilinear (``align_corners=True``) and the
    output stays at that size; a non-square image runs at its native size and the output is cropped
    to a multiple of 8 (375×500 → 368×496).
  * OSEDiff: ``convert('RGB')``; short side below the model's input size (128 for the SD-2.1 release:
    upstream's process size 512 / 4) → Pillow bicubic so the short side is that size; Pillow
    bicubic ×4 (Pillow's kernel, not torch's); Lanczos down to a multiple of 8 when needed; the model
    runs on that image at its native size (latent tiling above ``latent_tile`` only); no colour fix
    unless asked.
  Outputs are rounded to 8 bits on saving (upstream truncates: 0.999 → 254).

``color_fix="adain"`` (OSEDiff only) matches each output channel's mean/std to the upscaled input.
All inputs are decoded before any output is written, so a bad file fails the run before anything is
written.
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

from toolchain.errors import InputError
from toolchain.io.images import LoadedImage, list_images, load_image, save_image

COLOR_FIXES = ("none", "adain")


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


def from_model_output(out: torch.Tensor, place: Placement, orig_hw: tuple[int, int],
                      color_reference: torch.Tensor | None = None) -> np.ndarray:
    """Crop the padded output and resize to the original size; returns (H, W, 3) in [0, 1].

    ``color_reference`` (1, 3, H', W') in [-1, 1], the upscaled model input at the output's size: when
    given, the cropped output's channel statistics are matched to the same crop of it (AdaIN)."""
    crop = out[:, :, place.top : place.top + place.height, place.left : place.left + place.width]
    crop = (crop.float() + 1.0) / 2.0
    if color_reference is not None:
        from toolchain.models.osediff import adain_color_fix

        ref = color_reference[:, :, place.top : place.top + place.height, place.left : place.left + place.width]
        crop = adain_color_fix(crop, (ref.float() + 1.0) / 2.0)
    if crop.shape[-2:] != orig_hw:
        crop = F.interpolate(crop, size=orig_hw, mode="bicubic", antialias=True, align_corners=False)
    return crop.clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()


def _kind(model) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "kind", "osdface") or "osdface"


def check_restore_options(model, upstream: bool, color_fix: str) -> None:
    """Refuse option combinations the model cannot honour (InputError, one line)."""
    if color_fix not in COLOR_FIXES:
        raise InputError(f"unknown --color-fix '{color_fix}' (choose from {', '.join(COLOR_FIXES)})")
    if color_fix != "none" and _kind(model) != "osediff":
        raise InputError(f"--color-fix {color_fix} applies to osediff models only (this model is {_kind(model)})")
    if upstream and not hasattr(model, "config"):
        raise InputError("--upstream-preprocessing needs a model or quantized checkpoint of a known kind")


def _rgb_u8(img: LoadedImage) -> np.ndarray:
    """What upstream's ``convert('RGB')`` of an 8-bit file gives: RGB (alpha dropped) rounded to uint8."""
    return (np.clip(img.rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def upstream_osdface_input(img: LoadedImage, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """OSDFace's own preprocessing: (1, 3, S, S) bilinear ``align_corners=True`` for a square image, else the
    image at its native size; values in [-1, 1]. Returns (input, output (H, W)): S×S for squares, else the
    native size cropped down to multiples of 8."""
    t = torch.from_numpy(_rgb_u8(img)).permute(2, 0, 1)[None].float() / 255.0 * 2.0 - 1.0
    h, w = t.shape[-2:]
    if h == w:
        if h != size:
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=True)
        return t, (size, size)
    return t, (h - h % 8, w - w % 8)


def upstream_osediff_input(img: LoadedImage, upscale: int = 4, min_side: int = 128) -> torch.Tensor:
    """OSEDiff's own preprocessing with Pillow: short side < ``min_side`` → bicubic to ``min_side`` (sizes
    truncated as int()); bicubic ×``upscale``; Lanczos down to multiples of 8 when needed. ``min_side`` is
    upstream's process size over the upscale (512 / 4 = 128 for the release; ``restore_upstream`` passes the
    model's input size, which is 128 for an imported SD-2.1 release). Returns (1, 3, H, W) in [-1, 1]."""
    from PIL import Image

    im = Image.fromarray(_rgb_u8(img), "RGB")
    w, h = im.size
    if min(w, h) < min_side:
        s = min_side / min(w, h)
        im = im.resize((int(w * s), int(h * s)), Image.BICUBIC)
    im = im.resize((im.width * upscale, im.height * upscale), Image.BICUBIC)
    if im.width % 8 or im.height % 8:
        im = im.resize((im.width - im.width % 8, im.height - im.height % 8), Image.LANCZOS)
    t = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return t * 2.0 - 1.0


def restore_upstream(model, images: Sequence[LoadedImage], device: torch.device | str = "cpu", color_fix: str = "none",
                     progress: bool = True) -> list[np.ndarray]:
    """Restore with the release's own pre/post-processing (module docstring); one image per forward pass
    (sizes differ). Returns (H, W, 3) float32 RGB arrays in [0, 1] at upstream's output size."""
    check_restore_options(model, True, color_fix)
    kind = _kind(model)
    results = []
    with torch.no_grad():
        for img in tqdm(images, desc="restoring (upstream)", disable=not progress, unit="img"):
            if kind == "osediff":
                x_up = upstream_osediff_input(img, model.config.upscale, model.image_size).to(device)
                y = (model.forward_upscaled(x_up).float() + 1.0) / 2.0
                if color_fix == "adain":
                    from toolchain.models.osediff import adain_color_fix

                    y = adain_color_fix(y, (x_up.float() + 1.0) / 2.0)
            else:
                x, (oh, ow) = upstream_osdface_input(img, model.image_size)
                y = ((model(x.to(device)).float() + 1.0) / 2.0)[..., :oh, :ow]
            results.append(y.clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy())
    return results


def restore_arrays(model: Callable[[torch.Tensor], torch.Tensor], images: Sequence[LoadedImage], size: int,
                   batch_size: int = 4, device: torch.device | str = "cpu", progress: bool = True,
                   color_fix: str = "none") -> list[np.ndarray]:
    """Restore decoded images; returns RGB arrays at each image's original size (times the model's upscale factor).

    ``color_fix="adain"`` (osediff models) matches each output's channel mean/std to its upscaled input."""
    if color_fix != "none":
        check_restore_options(model, False, color_fix)
    prepared = [to_model_input(im, size) for im in images]
    results: list[np.ndarray] = []
    bar = tqdm(total=len(images), desc="restoring", disable=not progress, unit="img")
    with torch.no_grad():
        for k in range(0, len(prepared), batch_size):
            chunk = prepared[k : k + batch_size]
            x = torch.cat([c[0] for c in chunk]).to(device)
            y = model(x)
            f = y.shape[-1] // x.shape[-1]  # super-resolution kinds (osediff) return f× the input size
            ref = model.upscale(x) if color_fix == "adain" else None
            for j, (_, place) in enumerate(chunk):
                h, w = images[k + j].rgb.shape[:2]
                scaled = Placement(place.top * f, place.left * f, place.height * f, place.width * f)
                results.append(from_model_output(y[j : j + 1], scaled, (h * f, w * f),
                                                 None if ref is None else ref[j : j + 1]))
            bar.update(len(chunk))
    bar.close()
    return results


def restore_files(model: Callable[[torch.Tensor], torch.Tensor], inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  size: int, batch_size: int = 4, device: torch.device | str = "cpu", suffix: str = ".png", progress: bool = True,
                  upstream: bool = False, color_fix: str = "none") -> list[Path]:
    """Restore image files/directories into ``out_dir``; each output file is written atomically.

    Every input is decoded before anything is written, so one bad file fails the run with nothing
    written. ``out_dir`` is not checked here (``toolchain.io.outputs.check_output_files_into`` does).
    ``upstream``: the release's own pre/post-processing (RGB output, no alpha, upstream's size)."""
    check_restore_options(model, upstream, color_fix)
    paths = list_images(list(inputs))
    images = [load_image(p) for p in paths]  # decode everything first: bad input fails before any write
    if upstream:
        restored = restore_upstream(model, images, device, color_fix, progress)
    else:
        restored = restore_arrays(model, images, size, batch_size, device, progress, color_fix)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if upstream:  # convert('RGB'): grey becomes RGB, alpha is dropped
        return [save_image(out_dir / name, rgb, "RGB", None, software=RESTORE_SOFTWARE)
                for rgb, name in zip(restored, output_names(paths, suffix))]
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
