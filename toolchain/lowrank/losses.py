"""Distillation losses for low-rank / quantization-aware training, offline.

The paper's loss is 0.5·LPIPS(I_q, I_fp) + 0.5·MSE(I_q, I_fp). Standard LPIPS needs ImageNet
AlexNet weights that cannot be downloaded here: pass ``lpips_weights`` (the file
``alexnet-owt-7be5be79.pth`` or a folder holding it). Without it the loss falls back to the
shift-tolerant LPIPS whose weights ship in the ``stlpips-pytorch`` wheel, and says so loudly.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from toolchain.errors import MissingWeightsError

log = logging.getLogger("toolchain.losses")


def perceptual_loss(lpips_weights: str | Path | None) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """(loss(pred, target) on [-1, 1] images, a label of what it is)."""
    from toolchain.eval import metrics as M

    if lpips_weights:
        path = Path(lpips_weights)
        folder = path if path.is_dir() else path.parent
        if not (folder / M.LPIPS_ALEX_FILE).is_file():
            raise MissingWeightsError(f"--param lpips_weights={lpips_weights}: {folder / M.LPIPS_ALEX_FILE} not found "
                                      "(need torchvision's ImageNet AlexNet weights)")
        net = M._lpips_alex(str(folder))
        for p in net.parameters():
            p.requires_grad_(False)
        return (lambda a, b: net.to(a.device)(a.float(), b.float()).mean()), "LPIPS-Alex"
    # one line on stderr (it also went through logging's last-resort handler before, so it printed twice)
    from toolchain import distributed as D

    if not D.quiet_rank():  # once per run, not once per rank
        print(f"WARNING: LPIPS weights not given (pass --param lpips_weights=PATH to {M.LPIPS_ALEX_FILE}): using the "
              "shift-tolerant LPIPS from the stlpips-pytorch wheel as the perceptual term instead "
              "(a documented substitute, not the paper's LPIPS)", file=sys.stderr)
    net = M.stlpips_net()
    return (lambda a, b: net.to(a.device)(a.float(), b.float()).mean()), "ST-LPIPS (substitute)"


def distillation_loss(lpips_weights: str | Path | None, w_perceptual: float = 0.5, w_mse: float = 0.5):
    """loss(student, teacher) → (total, {term: scalar tensor}); images in [-1, 1]."""
    if w_perceptual == 0:  # MSE only: no perceptual network (and no weights file) needed
        perc, label = (lambda a, b: torch.zeros((), device=a.device)), "none"
    else:
        perc, label = perceptual_loss(lpips_weights)

    def loss(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        p = perc(student, teacher)
        m = F.mse_loss(student.float(), teacher.float())
        # logged terms stay tensors (read after the step: no host sync inside a CUDA-graphed step)
        return w_perceptual * p + w_mse * m, {"perceptual": p.detach(), "mse": m.detach()}

    loss.label = f"{w_perceptual}·{label} + {w_mse}·MSE"  # type: ignore[attr-defined]
    return loss
