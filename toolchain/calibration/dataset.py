"""HQ/LQ calibration sets on disk.

    <out>/hq/00000.png  <out>/lq/00000.png  ...  <out>/manifest.json

Two tasks: ``restore`` (scale 1: LQ = degraded HQ at the same size, for OSDFace) and ``sr`` (scale s > 1:
LQ = degraded HQ then bicubic-downscaled (antialiased) by 1/s, for OSEDiff's ×4 super-resolution). The
manifest records ``task``, ``scale`` and ``lq_size``; sets written before this field read as scale 1.

The manifest records the sources (with SHA-256), seed, size, degradation ranges and each
item's drawn parameters. A build writes into ``<out>.partial/`` and renames it into place when
complete; rerunning an interrupted build with the same settings resumes from the images already
written (each image depends only on (seed, index), so resumed sets are identical).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from toolchain.calibration.degrade import DegradationConfig, degrade
from toolchain.errors import InputError
from toolchain.io.atomic import atomic_write_json, swap_into_place
from toolchain.io.hashing import sha256_file
from toolchain.io.outputs import check_output_dir, output_lock
from toolchain.io.images import list_images, load_image, save_image

MANIFEST_VERSION = 1
MAX_SIZE = 2048  # pixels per side; the largest preset works at 512


def is_calibration_set(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder holding a calibration-set manifest (a previous artifact of this stage)."""
    try:
        return json.loads((Path(path) / "manifest.json").read_text()).get("kind") == "quantface-calibration-set"
    except (OSError, ValueError, AttributeError):
        return False


def square_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Center-crop to a square and resize to ``size`` (Lanczos)."""
    h, w = rgb.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = rgb[top : top + s, left : left + s]
    im = Image.fromarray((np.clip(crop, 0, 1) * 255 + 0.5).astype(np.uint8))
    if s != size:
        im = im.resize((size, size), Image.LANCZOS)
    return np.asarray(im, dtype=np.float32) / 255.0


def build_calibration_set(
    hq_inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    n: int,
    size: int,
    seed: int = 0,
    config: DegradationConfig | None = None,
    progress: bool = True,
    overwrite: bool = False,
    scale: int = 1,
) -> Path:
    """Build ``n`` HQ/LQ pairs at ``size``×``size`` px from HQ face images (cycled, with flips, if n > sources).

    ``scale`` > 1 makes super-resolution pairs: LQ is the degraded HQ bicubic-downscaled to
    ``size // scale`` (``size`` must be a multiple of ``scale``, LQ at least 4 px).

    ``out`` must be new, empty, a previous calibration set (replaced whole on success) or, with
    ``overwrite``, anything that is not an input; it may never be or contain an input. Work goes to
    ``<out>.partial/`` under a lock on ``out``; a rerun with the same settings and unchanged source
    files resumes there, any difference restarts (a note on stderr says what changed).
    Raises InputError / OutputError (one line each)."""
    config = config or DegradationConfig()
    out = Path(out)
    if n < 1:
        raise InputError("the calibration set needs at least one image (-n >= 1)")
    if not 16 <= size <= MAX_SIZE:
        raise InputError(f"--size {size} is out of range (16 to {MAX_SIZE} pixels)")
    if scale < 1 or size % scale or size // scale < 4:
        raise InputError(f"--size {size} must be a multiple of the SR scale {scale} with at least 4 LQ pixels")
    hq_inputs = list(hq_inputs)
    check_output_dir(out, "calibration set", is_calibration_set, inputs=hq_inputs, overwrite=overwrite)
    sources = list_images(hq_inputs, what="--hq")
    with output_lock(out):
        return _build_locked(sources, out, n, size, seed, config, progress, scale)


def _resume_note(old: dict | None, new: dict) -> str | None:
    if old is None:
        return "its settings file is unreadable"
    changed = [k for k in new if old.get(k) != new[k]]
    return f"{', '.join(changed)} changed" if changed else None


def sr_downscale(lq: np.ndarray, scale: int) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] → (H/scale, W/scale, 3): antialiased bicubic (torch), clamped to [0, 1]."""
    if scale == 1:
        return lq
    t = torch.from_numpy(np.ascontiguousarray(lq)).permute(2, 0, 1)[None]
    h, w = lq.shape[:2]
    t = F.interpolate(t, size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False)
    return t.clamp(0, 1)[0].permute(1, 2, 0).numpy()


def _build_locked(sources: list[Path], out: Path, n: int, size: int, seed: int, config: DegradationConfig, progress: bool,
                  scale: int = 1) -> Path:
    import sys

    partial = out.parent / (out.name + ".partial")
    hashes = {str(p): sha256_file(p) for p in sources}
    # JSON round trip: the saved file holds lists where the in-memory settings hold tuples
    settings = json.loads(json.dumps({"seed": seed, "size": size, "count": n, "scale": scale, "degradation": config.to_dict(),
                                      "sources": [str(p) for p in sources], "source_sha256": [hashes[str(p)] for p in sources]}))
    state_file = partial / "settings.json"
    if partial.exists():
        try:
            old = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        why = _resume_note(old, settings)
        if why:
            print(f"note: not resuming the interrupted build in {partial} ({why}); starting over", file=sys.stderr)
            shutil.rmtree(partial)
    (partial / "hq").mkdir(parents=True, exist_ok=True)
    (partial / "lq").mkdir(parents=True, exist_ok=True)
    atomic_write_json(state_file, settings)
    items = []
    for i in tqdm(range(n), desc="building calibration set", disable=not progress):
        src = sources[i % len(sources)]
        flip = bool((i // len(sources)) % 2)
        name = f"{i:05d}.png"
        lq_path, hq_path, params_path = partial / "lq" / name, partial / "hq" / name, partial / "lq" / f"{i:05d}.json"
        if lq_path.exists() and hq_path.exists() and params_path.exists():
            params = json.loads(params_path.read_text())
        else:
            hq = square_resize(load_image(src).rgb, size)
            if flip:
                hq = hq[:, ::-1].copy()
            lq, params = degrade(hq, seed, i, config)
            lq = sr_downscale(lq, scale)
            save_image(hq_path, hq)
            save_image(lq_path, lq)
            atomic_write_json(params_path, params)
        items.append({"index": i, "file": name, "source": src.name, "source_sha256": hashes[str(src)], "flip": flip, "params": params})
    manifest = {"version": MANIFEST_VERSION, "kind": "quantface-calibration-set", "seed": seed, "size": size, "count": n,
                "task": "sr" if scale > 1 else "restore", "scale": scale, "lq_size": size // scale,
                "degradation": config.to_dict(), "items": items}
    for p in (partial / "lq").glob("*.json"):
        p.unlink()
    state_file.unlink()
    atomic_write_json(partial / "manifest.json", manifest)
    return swap_into_place(partial, out)


@dataclass
class CalibrationSet:
    """A built calibration set; images are returned as NCHW tensors in [-1, 1]."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | os.PathLike) -> "CalibrationSet":
        root = Path(root)
        mpath = root / "manifest.json"
        if not root.is_dir():
            raise InputError(f"{root} does not exist; build a calibration set there with `toolchain calibrate`")
        if not mpath.is_file():
            raise InputError(f"{root} is not a calibration set (no manifest.json); build one with `toolchain calibrate`")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{mpath} is unreadable: {exc}") from None
        if manifest.get("kind") != "quantface-calibration-set" or manifest.get("version") != MANIFEST_VERSION:
            raise InputError(f"{mpath} is not a version-{MANIFEST_VERSION} calibration manifest")
        return cls(root, manifest)

    def __len__(self) -> int:
        return len(self.manifest["items"])

    @property
    def scale(self) -> int:
        """HQ/LQ size ratio: 1 for restoration sets, 4 for ×4 super-resolution pairs."""
        return int(self.manifest.get("scale", 1))

    def check_for(self, model_upscale: int) -> None:
        """Refuse a set whose task does not match a model's upscale factor (InputError, one line)."""
        if self.scale != model_upscale:
            want = f"--task sr --scale {model_upscale}" if model_upscale > 1 else "--task restore"
            raise InputError(f"{self.root} holds {'x%d SR' % self.scale if self.scale > 1 else 'restoration'} pairs but the "
                             f"model {'upscales x%d' % model_upscale if model_upscale > 1 else 'restores at the same size'}; "
                             f"build a set with `toolchain calibrate --hq DIR {want} --out NEW_SET`")

    def names(self) -> list[str]:
        return [it["file"] for it in self.manifest["items"]]

    def _load(self, sub: str, i: int, size: int) -> torch.Tensor:
        rgb = load_image(self.root / sub / self.manifest["items"][i]["file"]).rgb
        t = torch.from_numpy(rgb).permute(2, 0, 1)[None]
        if t.shape[-1] != size or t.shape[-2] != size:
            t = F.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return t * 2.0 - 1.0

    def lq(self, i: int, size: int) -> torch.Tensor:
        return self._load("lq", i, size)

    def hq(self, i: int, size: int) -> torch.Tensor:
        return self._load("hq", i, size)

    def batches(self, size: int, batch_size: int = 4, limit: int | None = None, which: str = "lq", start: int = 0) -> list[torch.Tensor]:
        idx = list(range(start, len(self) if limit is None else min(len(self), start + limit)))
        load = self.lq if which == "lq" else self.hq
        return [torch.cat([load(i, size) for i in idx[k : k + batch_size]]) for k in range(0, len(idx), batch_size)]
