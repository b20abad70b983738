"""Shared fixtures: small models and calibration sets built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import toolchain  # noqa: F401  (quiets third-party import chatter)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
UTKFACE = SHARED / "assets" / "faces" / "utkface"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    from toolchain.models import build_model, preset, save_model

    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_model(build_model(preset("tiny"), seed=0), path)
    return path


@pytest.fixture()
def tiny_model(tiny_model_path):
    from toolchain.models import load_model

    return load_model(tiny_model_path)


@pytest.fixture(scope="session")
def ref_model_path() -> Path:
    from toolchain.defaults import DEFAULT_MODEL

    assert DEFAULT_MODEL.is_file(), "the bundled reference model is part of the repository"
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory) -> Path:
    """8 HQ/LQ pairs at 64 px from the bundled public-domain faces."""
    from toolchain.calibration import BUNDLED_FACES
    from toolchain.calibration.dataset import build_calibration_set

    return build_calibration_set([BUNDLED_FACES], tmp_path_factory.mktemp("calib") / "set", n=8, size=64, seed=0, progress=False)


@pytest.fixture(scope="session")
def heldout_dir(tmp_path_factory) -> Path:
    """Held-out UTKFace faces (never used to train the reference model) degraded at 128 px;
    falls back to the bundled faces when ../shared is not present."""
    import json

    from toolchain.calibration.dataset import build_calibration_set

    from toolchain.calibration import BUNDLED_FACES

    if UTKFACE.is_dir():
        split = json.loads((REPO / "benchmarks" / "results" / "reference_model" / "split.json").read_text())
        folder = tmp_path_factory.mktemp("heldout_src")
        for name in split["heldout"][:12]:
            os.symlink(UTKFACE / name, folder / name)
    else:  # CI without ../shared: the bundled faces with a degradation seed no other fixture uses
        folder = BUNDLED_FACES
    return build_calibration_set([folder], tmp_path_factory.mktemp("heldout") / "set", n=12, size=128, seed=7, progress=False)


def tiny_batches(n: int = 2, batch: int = 2, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, size, size, generator=g) * 2 - 1 for _ in range(n)]
