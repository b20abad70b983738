"""Reading and writing face images of any format Pillow opens, any size and colour mode.

Images enter the toolchain as float32 RGB arrays in [0, 1] (H, W, 3). Pixel values are scaled by the
file's own sample format, read from Pillow's metadata — never by the data's maximum, so a nearly black
16-bit photo stays nearly black:

=====================  ==========================================  =========================
Pillow mode            what                                        scale to [0, 1]
=====================  ==========================================  =========================
1, L, P, RGB, CMYK,    1/8-bit per sample (palette, CMYK and       via ``convert("RGB")`` /255
YCbCr, LAB, HSV        YCbCr are converted by Pillow)
I;16, I;16B, I;16L     16-bit greyscale (PNG, TIFF)                /65535
I                      32-bit integer; its real depth from the     /(2^bits − 1), bits from
                       format (PNG: 16) or TIFF ``BitsPerSample``  the file; unknown → refused
F                      32-bit float greyscale (TIFF)               as stored (0.0–1.0); NaN/Inf
                                                                   refused, others clipped
RGBA, LA, PA, P+tRNS   with alpha                                  alpha kept beside RGB
=====================  ==========================================  =========================

EXIF orientation is applied. Animated/multi-frame files are refused (which frame would be meant?).
The original alpha channel and colour mode are kept beside the pixels so a restored image can be
written back in the same mode (grey stays grey, RGBA keeps its alpha).

Folders are scanned by content, not by extension: every file Pillow can open is used, everything else
is listed as skipped with its reason (``scan_images``), so nothing is dropped silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from toolchain.errors import InputError
from toolchain.io.atomic import atomic_write_bytes

# Kept for callers that want a quick name filter; folders are scanned by content (scan_images).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
EIGHT_BIT_MODES = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


@dataclass
class LoadedImage:
    """RGB pixels in [0, 1] plus what is needed to write the image back faithfully."""

    rgb: np.ndarray  # (H, W, 3) float32 in [0, 1]
    alpha: np.ndarray | None  # (H, W) float32 in [0, 1] or None
    mode: str  # output mode: "RGB", "RGBA", "L", "LA"
    path: Path | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.rgb.shape[1], self.rgb.shape[0]


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Decode an image file of any format Pillow opens.

    Returns a LoadedImage (see the module table for how each sample format is scaled). Raises
    InputError naming the file for anything unusable: missing, a folder, not an image, truncated,
    animated, an unknown integer depth, or non-finite float samples."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if path.is_dir():
        raise InputError(f"expected an image file, got a directory: {path}")
    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                raise InputError(f"{path} is animated or has {frames} frames; save the frame to restore as a still image")
            im.load()
            bits = _integer_bits(im)
            im = ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image file Pillow can read") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None
    try:
        return from_pil(im, path, bits)
    except ValueError as exc:  # a pixel format Pillow cannot convert to RGB
        raise InputError(f"cannot convert {path} (mode {im.mode}) to RGB: {exc}") from None


def _integer_bits(im: Image.Image) -> int | None:
    """Bits per sample of a 32-bit-container integer image, from the file's metadata (None if unknown)."""
    if im.mode != "I":
        return None
    if im.format == "PNG":
        return 16  # PNG stores at most 16-bit grey; Pillow widens some to mode I
    tags = getattr(im, "tag_v2", None)
    if tags is not None and 258 in tags:
        bps = tags[258]
        return int(bps[0] if isinstance(bps, tuple) else bps)
    return None


def from_pil(im: Image.Image, path: Path | None = None, bits: int | None = None) -> LoadedImage:
    """Convert a PIL image of any mode to a LoadedImage, scaling by the sample format (never the data).

    ``bits`` is the real depth of a mode-"I" image (see ``load_image``). Raises InputError."""
    name = path or "image"
    if im.width < 2 or im.height < 2:
        raise InputError(f"{name} is too small ({im.width}x{im.height})")
    mode = im.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I" or mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if mode == "F":
            if not np.isfinite(arr).all():
                raise InputError(f"{name} holds {int((~np.isfinite(arr)).sum())} non-finite (NaN/Inf) pixel values")
        elif mode == "I":
            if bits is None:
                bits = _integer_bits(im)
            if bits is None or not 1 <= bits <= 32:
                raise InputError(f"{name} is a 32-bit integer image of unknown bit depth; save it as 8/16-bit or float")
            arr = arr / float(2**bits - 1)
        else:
            arr = arr / 65535.0
        grey = np.clip(arr, 0.0, 1.0).astype(np.float32)
        return LoadedImage(np.repeat(grey[..., None], 3, axis=2), None, "L", path)
    if mode in ("RGBA", "LA", "PA", "RGBa") or (mode == "P" and "transparency" in im.info) or (mode in ("L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        alpha = np.asarray(rgba, dtype=np.float32)[..., 3] / 255.0
        out_mode = "LA" if mode in ("LA", "L") else "RGBA"
        rgb = np.asarray(rgba.convert("RGB"), dtype=np.float32) / 255.0
        return LoadedImage(rgb, alpha, out_mode, path)
    if mode not in EIGHT_BIT_MODES:
        raise InputError(f"{name} has the pixel format '{mode}', which this toolchain does not read; save it as 8/16-bit RGB or grey")
    out_mode = "L" if mode in ("L", "1") else "RGB"
    rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return LoadedImage(rgb, None, out_mode, path)


def to_pil(rgb: np.ndarray, mode: str = "RGB", alpha: np.ndarray | None = None) -> Image.Image:
    """Turn float RGB in [0, 1] back into a PIL image of the requested mode."""
    u8 = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    im = Image.fromarray(u8, "RGB")
    if mode in ("L", "LA"):
        im = im.convert("L")
    if alpha is not None and mode in ("RGBA", "LA"):
        a = Image.fromarray((np.clip(alpha, 0, 1) * 255.0 + 0.5).astype(np.uint8), "L")
        if a.size != im.size:
            a = a.resize(im.size, Image.BILINEAR)
        im.putalpha(a)
    return im


def save_image(path: str | os.PathLike, rgb: np.ndarray, mode: str = "RGB", alpha: np.ndarray | None = None, quality: int = 95,
               software: str | None = None) -> Path:
    """Write an image atomically; the format follows the suffix (JPEG drops alpha).

    ``software`` (PNG only) is stored as the PNG ``Software`` text field, so a later run can tell its own
    outputs from the user's files (``written_by``)."""
    import io

    from PIL import PngImagePlugin

    path = Path(path)
    im = to_pil(rgb, mode, alpha)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"unsupported output image type '{path.suffix}' for {path}")
    if fmt == "JPEG" and im.mode in ("RGBA", "LA"):
        im = im.convert("RGB" if im.mode == "RGBA" else "L")
    buf = io.BytesIO()
    extra: dict = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    if software and fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", software)
        extra["pnginfo"] = info
    im.save(buf, format=fmt, **extra)
    return atomic_write_bytes(path, buf.getvalue())


def written_by(path: str | os.PathLike) -> str | None:
    """The PNG ``Software`` text of ``path`` (None if absent or unreadable)."""
    try:
        with Image.open(path) as im:
            value = im.info.get("Software")
    except (OSError, ValueError, SyntaxError):
        return None
    return value if isinstance(value, str) else None


@dataclass
class ImageScan:
    """Result of expanding files and folders: the images to use and what was skipped, with reasons."""

    paths: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def skipped_text(self) -> str:
        """"skipped 2: b.gif (animated), x.txt (not an image)" or "" when nothing was skipped."""
        if not self.skipped:
            return ""
        return f"skipped {len(self.skipped)}: " + ", ".join(f"{p.name} ({why})" for p, why in self.skipped)


def probe_image(path: Path) -> str | None:
    """None if Pillow can open ``path`` as a still image, else a short reason ("not an image", "animated", ...)."""
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                return "animated" if im.format in ("GIF", "PNG", "WEBP") else f"{im.n_frames} frames"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"unreadable: {str(exc)[:80]}"
    return None


def unusable_reason(path: Path) -> str | None:
    """None if ``path`` decodes into a usable image (``load_image`` succeeds), else a short reason without
    the path ("not an image", "animated", "too small (1x3)", "holds 4 non-finite (NaN/Inf) pixel values", ...)."""
    why = probe_image(path)
    if why is not None:
        return why
    try:
        load_image(path)
    except InputError as exc:
        msg, name = str(exc), str(path)
        msg = msg[len(name):] if msg.startswith(name) else msg.replace(f" {name}", "")
        msg = msg.strip(" :")
        return (msg[3:] if msg.startswith("is ") else msg)[:100]
    return None


def scan_images(inputs: list[str | os.PathLike], what: str = "input") -> ImageScan:
    """Expand files and folders (non-recursive) into images, by content rather than extension.

    Files named explicitly must be readable images (InputError otherwise, naming the file); inside a
    folder, every file that decodes into a usable image is used and everything else — non-images,
    animated, truncated or too-small files, non-finite float images, sub-folders, hidden files — is
    recorded in ``skipped`` with its reason.
    Raises InputError if an input is missing or no image is found at all."""
    scan = ImageScan()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for q in sorted(p.iterdir()):
                if q.name.startswith("."):
                    scan.skipped.append((q, "hidden"))
                elif q.is_dir():
                    scan.skipped.append((q, "folder"))
                elif (why := unusable_reason(q)) is not None:
                    scan.skipped.append((q, why))
                else:
                    scan.paths.append(q)
        elif p.exists():
            why = probe_image(p)
            if why is not None:
                raise InputError(f"{p} cannot be used: {why}")
            scan.paths.append(p)
        else:
            raise InputError(f"{what} not found: {p}")
    if not scan.paths:
        detail = f" ({scan.skipped_text()})" if scan.skipped else ""
        raise InputError(f"no usable images in {', '.join(str(i) for i in inputs)}{detail}")
    return scan


def list_images(inputs: list[str | os.PathLike], what: str = "input") -> list[Path]:
    """The image paths of ``scan_images`` (skipped files are dropped; use scan_images to report them)."""
    return scan_images(inputs, what).paths
