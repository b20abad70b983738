"""``fit``: the Trainer over a fixed list of calibration batches, epoch order seeded per epoch.

Every trained quantization method (QD-LoRA, PassionSR, EfficientDM, Q-Diffusion, QArtSR) goes
through here, so all of them resume after an interruption, show progress, are deterministic
under a seed and leave a loss curve. Under torchrun the Trainer runs data-parallel (rank 0 writes
the loss curve); methods that pass ``batches`` have every global batch split across the ranks.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from toolchain import distributed as D
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
        checkpoint_every: int = 50, title: str | None = None, batches: Callable[[int], Any] | None = None,
        graphable: bool = False) -> dict[str, Any]:
    """Minimise ``loss_fn(step, batch_index)`` over ``params``; returns a summary with a thinned history.

    With ``batches`` (batch index → a tensor or tuple of tensors, sample axis first, e.g. inputs and
    targets), ``loss_fn`` receives ``(step, batch)`` instead, and the loss must be a mean over the
    samples: under torchrun each rank then gets only its rows of the batch (data parallelism with
    the 1-process result). Entries of the tuple that are not tensors (e.g. the batch index, to look up
    per-batch constants the loss keeps) reach every rank unchanged; a tensor that is not laid out by
    sample belongs in the loss's closure, not in the tuple. Without it every rank computes whole batches. ``graphable`` (with
    ``batches`` giving a tuple of tensors of fixed shapes): the loss ignores ``step``, never syncs with
    the host and logs tensors, so on CUDA the step is captured once in a CUDA graph and replayed
    (toolchain/train/graphs.py; ``TOOLCHAIN_CUDA_GRAPH=off`` runs it eagerly)."""
    if not params or steps <= 0:
        return {"trained_parameters": 0, "steps": 0}
    for p in params.values():
        p.requires_grad_(True)
    index = epoch_order(seed, n_batches)
    scratch = tempfile.TemporaryDirectory(prefix="fit-") if workdir is None else None  # no resume without a workdir
    work = Path(workdir) if workdir is not None else Path(scratch.name)
    cfg = TrainConfig(steps=steps, lr=lr, seed=seed, checkpoint_every=checkpoint_every, grad_clip=grad_clip,
                      lr_schedule=lr_schedule, milestones=milestones)
    if batches is None:
        trainer = Trainer(params, lambda step, _: loss_fn(step, index(step)), lambda step: None, work, cfg, device, desc=desc)
    else:
        trainer = Trainer(params, loss_fn, lambda step: batches(index(step)), work, cfg, device, desc=desc, shardable=True,
                          graphable=graphable)
    try:
        history = trainer.run()
        if history and scratch is None and D.is_main():
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
