"""Shared set-up for benchmarks: calibration and held-out sets from the UTKFace split.

The reference model's split (benchmarks/results/reference_model/split.json) names the held-out
faces; calibration images come only from the training part, evaluation images only from the
held-out part. Sets are cached under benchmarks/.cache (git-ignored) keyed by their settings.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CACHE = REPO / "benchmarks" / ".cache"
DEFAULT_FACES = REPO.parent / "shared" / "assets" / "faces" / "utkface"
SPLIT = RESULTS / "reference_model" / "split.json"


def _linked_folder(names: list[str], faces: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = folder / name
        if not link.exists():
            os.symlink((faces / name).resolve(), link)
    return folder


def face_sets(faces: Path = DEFAULT_FACES, n_calib: int = 64, n_eval: int = 64, size: int = 128, seed: int = 0) -> tuple[Path, Path]:
    """(calibration set from training faces, evaluation set from held-out faces)."""
    from toolchain.calibration.dataset import build_calibration_set

    if not faces.is_dir():
        raise SystemExit(f"faces folder {faces} not found; pass --faces (UTKFace aligned faces)")
    split = json.loads(SPLIT.read_text())
    calib_dir = CACHE / f"calib_n{n_calib}_s{size}_seed{seed}"
    eval_dir = CACHE / f"heldout_n{n_eval}_s{size}_seed{seed + 1}"
    if not (calib_dir / "manifest.json").is_file():
        src = _linked_folder(split["train"][:: max(1, len(split["train"]) // n_calib)][:n_calib], faces, CACHE / "src_calib")
        build_calibration_set([src], calib_dir, n_calib, size, seed)
    if not (eval_dir / "manifest.json").is_file():
        src = _linked_folder(split["heldout"][:n_eval], faces, CACHE / "src_heldout")
        build_calibration_set([src], eval_dir, n_eval, size, seed + 1)
    return calib_dir, eval_dir


def environment() -> dict:
    """Where a number was measured."""
    cpu = platform.processor() or platform.machine()
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cpu": cpu, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "git": _git_revision()}


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line() -> str:
    return "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO)) if Path(sys.argv[0]).is_absolute() else sys.argv[0], *sys.argv[1:]])
