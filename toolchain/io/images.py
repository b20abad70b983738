"""Reading and writing face images of any common format, size and colour mode.

Images enter the toolchain as float32 RGB arrays in [0, 1] (H, W, 3). The original alpha
channel and colour mode are kept beside the pixels so a restored image can be written back in
the same mode (grey stays grey, RGBA keeps its alpha).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from toolchain.errors import InputError
from toolchain.io.atomic import atomic_write_bytes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class LoadedImage:
    """RGB pixels in [0, 1] plus what is needed to write the image back faithfully."""

    rgb: np.ndarray  # (H, W, 3) float32
    alpha: np.ndarray | None  # (H, W) float32 or None
    mode: str  # "RGB", "RGBA", "L", "LA"
    path: Path | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Load an image file; raise InputError with the file name for anything unusable."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if path.is_dir():
        raise InputError(f"expected an image file, got a directory: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image file PIL can read") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None
    return from_pil(im, path)


def from_pil(im: Image.Image, path: Path | None = None) -> LoadedImage:
    """Convert a PIL image of any mode to a LoadedImage."""
    if im.width < 2 or im.height < 2:
        raise InputError(f"{path or 'image'} is too small ({im.width}x{im.height})")
    mode = im.mode
    alpha = None
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32)
        arr = arr / (65535.0 if arr.max() > 255 else 255.0)
        rgb = np.repeat(arr[..., None], 3, axis=2)
        return LoadedImage(np.clip(rgb, 0, 1).astype(np.float32), None, "L", path)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        alpha = np.asarray(rgba, dtype=np.float32)[..., 3] / 255.0
        out_mode = "LA" if mode == "LA" else "RGBA"
        rgb = np.asarray(rgba.convert("RGB"), dtype=np.float32) / 255.0
        return LoadedImage(rgb, alpha, out_mode, path)
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


def save_image(path: str | os.PathLike, rgb: np.ndarray, mode: str = "RGB", alpha: np.ndarray | None = None, quality: int = 95) -> Path:
    """Write an image atomically; the format follows the suffix (JPEG drops alpha)."""
    import io

    path = Path(path)
    im = to_pil(rgb, mode, alpha)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"unsupported output image type '{path.suffix}' for {path}")
    if fmt == "JPEG" and im.mode in ("RGBA", "LA"):
        im = im.convert("RGB" if im.mode == "RGBA" else "L")
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
    return atomic_write_bytes(path, buf.getvalue())


def list_images(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand files and directories into a sorted list of image paths (directories non-recursive)."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not found:
                raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in directory {p}")
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        else:
            raise InputError(f"input not found: {p}")
    return paths
