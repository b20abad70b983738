"""Training batches that are pure functions of the step number.

``FaceDegradationBatches(step)`` draws the faces and degradations of a step from a generator
seeded by (seed, step), so a resumed run sees exactly the batches it would have seen. On a
machine with spare cores the same batches are produced ahead of time by DataLoader workers
(``prefetch``), still in step order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from toolchain.calibration.dataset import square_resize
from toolchain.calibration.degrade import DegradationConfig, degrade
from toolchain.io.images import load_image


def load_faces(paths: Sequence[Path], size: int) -> np.ndarray:
    """HQ faces center-cropped and resized to size×size, uint8 (N, size, size, 3)."""
    return np.stack([(square_resize(load_image(p).rgb, size) * 255 + 0.5).astype(np.uint8) for p in paths])


class FaceDegradationBatches(Dataset):
    """Indexable by step: returns (lq, hq) tensors (B, 3, S, S) in [-1, 1]."""

    def __init__(self, faces: np.ndarray, batch_size: int, seed: int = 0, config: DegradationConfig | None = None):
        self.faces = faces
        self.batch_size = batch_size
        self.seed = seed
        self.config = config or DegradationConfig()

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        idx = rng.integers(0, len(self.faces), self.batch_size)
        flips = rng.random(self.batch_size) < 0.5
        lqs, hqs = [], []
        for j, (i, flip) in enumerate(zip(idx, flips)):
            hq = self.faces[i].astype(np.float32) / 255.0
            if flip:
                hq = hq[:, ::-1].copy()
            lq, _ = degrade(hq, self.seed, step * self.batch_size + j, self.config)
            lqs.append(torch.from_numpy(np.ascontiguousarray(lq)).permute(2, 0, 1))
            hqs.append(torch.from_numpy(hq).permute(2, 0, 1))
        return torch.stack(lqs) * 2 - 1, torch.stack(hqs) * 2 - 1


class PrefetchedSteps:
    """Callable step → batch backed by DataLoader workers; restarts if steps are not consecutive."""

    def __init__(self, dataset: Dataset, total_steps: int, workers: int = 0):
        self.dataset = dataset
        self.total = total_steps
        self.workers = workers
        self._iter: Iterator | None = None
        self._next = -1

    def __call__(self, step: int):
        if self.workers == 0:
            return self.dataset[step]
        if self._iter is None or step != self._next:
            loader = DataLoader(self.dataset, batch_size=None, sampler=range(step, self.total), num_workers=self.workers,
                                prefetch_factor=4, persistent_workers=False)
            self._iter = iter(loader)
        self._next = step + 1
        return next(self._iter)
