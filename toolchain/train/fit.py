"""``fit``: the Trainer over a fixed list of calibration batches, epoch order seeded per epoch.

Every trained quantization method (QD-LoRA, PassionSR, EfficientDM, Q-Diffusion, QArtSR) goes
through here, so all of them resume after an interruption, show progress, are deterministic
under a seed and leave a loss curve.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from toolchain.train.trainer import TrainConfig, Trainer, plot_loss_curve


def epoch_order(seed: int, n: int) -> Callable[[int], int]:
    cache: dict[int, np.ndarray] = {}

    def index(step: int) -> int:
        epoch, k = divmod(step, n)
        if epoch not in cache:
            cache[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        return int(cache[epoch][k])

    return index


def fit(params: dict[str, torch.nn.Parameter], loss_fn: Callable[[int, int], tuple[torch.Tensor, dict[str, float]]], n_batches: int,
        steps: int, lr: float, seed: int, device: torch.device, workdir: Path | None, desc: str,
        lr_schedule: str = "constant", milestones: tuple[int, ...] = (), grad_clip: float | None = None,
        checkpoint_every: int = 50, title: str | None = None,
        inputs: Callable[[int], tuple[torch.Tensor, ...]] | None = None) -> dict[str, Any]:
    """Minimise ``loss_fn(step, batch_index)`` over ``params``; returns a summary with a thinned history.

    With ``inputs`` (batch index → tuple of tensors, same shapes for every index), ``loss_fn`` is
    called as ``loss_fn(*tensors)`` instead (tensors on ``device``; logged terms as tensors, no host
    sync): on CUDA that step is captured once in a CUDA graph and replayed (toolchain/train/graphs.py).
    """
    if not params or steps <= 0:
        return {"trained_parameters": 0, "steps": 0}
    for p in params.values():
        p.requires_grad_(True)
    index = epoch_order(seed, n_batches)
    scratch = tempfile.TemporaryDirectory(prefix="fit-") if workdir is None else None  # no resume without a workdir
    work = Path(workdir) if workdir is not None else Path(scratch.name)
    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, checkpoint_every=checkpoint_every, grad_clip=grad_clip,
                      lr_schedule=lr_schedule, milestones=milestones)
    if inputs is None:
        trainer = Trainer(params, lambda step, _: loss_fn(step, index(step)), lambda step: None, work, cfg, device, desc=desc)
    else:
        trainer = Trainer(params, lambda step, batch: loss_fn(*(t.to(device) for t in batch)), lambda step: inputs(index(step)), work, cfg,
                          device, desc=desc, tensor_loss=loss_fn)
    try:
        history = trainer.run()
        if history and scratch is None:
            plot_loss_curve(history, work / "loss_curve.png", title or desc)
    finally:
        for p in params.values():
            p.requires_grad_(False)
        if scratch is not None:
            scratch.cleanup()
    tenth = max(1, len(history) // 10)
    return {"trained_parameters": int(sum(p.numel() for p in params.values())), "steps": steps, "lr": lr,
            "loss_first_10pct": float(np.mean([h["loss"] for h in history[:tenth]])) if history else None,
            "loss_last_10pct": float(np.mean([h["loss"] for h in history[-tenth:]])) if history else None,
            "history": history[:: max(1, len(history) // 200)], "seconds": round(getattr(trainer, "elapsed", 0.0), 2)}
