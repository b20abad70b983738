"""Before/after image grids: one row per face, one labelled column per variant."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from toolchain.io.atomic import atomic_write_bytes


def _tile(img: torch.Tensor, cell: int) -> Image.Image:
    arr = (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    im = Image.fromarray(arr)
    return im.resize((cell, cell), Image.NEAREST if im.width < cell else Image.LANCZOS)


def save_grid(path: str | os.PathLike, columns: dict[str, torch.Tensor], captions: dict[str, Sequence[str]] | None = None,
              max_rows: int = 4, cell: int = 160) -> Path:
    """``columns``: label → images (N,3,H,W) in [0,1]; optional per-image captions per column."""
    labels = list(columns)
    n = min(max_rows, min(v.shape[0] for v in columns.values()))
    header, cap_h = 22, 16 if captions else 0
    W, H = cell * len(labels), header + n * (cell + cap_h)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, label in enumerate(labels):
        draw.text((c * cell + 4, 4), label[:28], fill="black", font=font)
        for r in range(n):
            y = header + r * (cell + cap_h)
            canvas.paste(_tile(columns[label][r], cell), (c * cell, y))
            if captions and label in captions:
                draw.text((c * cell + 4, y + cell + 2), captions[label][r][:30], fill="black", font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
