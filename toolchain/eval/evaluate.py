"""Run restoration variants on a calibration/eval set and score them.

Every variant (FP model, quantized checkpoints) restores the same LQ images; each is scored
against the HQ ground truth and — for quantized variants — against the FP output, which
isolates the quantization error from the model's own restoration error.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from toolchain.calibration.dataset import CalibrationSet
from toolchain.errors import ConfigError, MissingWeightsError
from toolchain.eval import metrics as M


def restore_set(model: Callable[[torch.Tensor], torch.Tensor], lq_batches: list[torch.Tensor], device: torch.device | str = "cpu",
                desc: str = "restoring") -> torch.Tensor:
    """Restore pre-batched LQ tensors ([-1,1]); returns images in [0,1] on CPU."""
    outs = []
    with torch.no_grad():
        for b in tqdm(lq_batches, desc=desc, leave=False, disable=_quiet_rank()):
            outs.append(((model(b.to(device)).float().cpu() + 1) / 2).clamp(0, 1))
    return torch.cat(outs)


def resolve_metrics(names: list[str], weights_dir: str | None, image_size: int | None = None) -> tuple[list[str], dict[str, str]]:
    """Keep metrics whose weights are present; explain the others (weights missing → skipped with the reason).

    ``image_size``: the side of the images to be scored, when known; ``niqe`` is skipped below its 96 px patch.
    Raises ConfigError for a name that is no metric at all, and for an empty list."""
    known = ", ".join(M.PAIRED_METRICS + M.SET_METRICS)
    if not names:
        raise ConfigError(f"--metrics is empty (known: {known})")
    usable, skipped = [], {}
    for name in names:
        try:
            M.check_metric_available(name, weights_dir)
        except KeyError:
            raise ConfigError(f"unknown metric '{name}' (known: {known})") from None
        except MissingWeightsError as exc:
            skipped[name] = str(exc)
            continue
        if name == "niqe" and image_size is not None and image_size < M.NIQE_MIN_SIZE:
            skipped[name] = f"NIQE needs images of at least {M.NIQE_MIN_SIZE}×{M.NIQE_MIN_SIZE} px (its patch size); these are {image_size} px"
            continue
        usable.append(name)
    return usable, skipped


def score(pred: torch.Tensor, ref: torch.Tensor, metrics: list[str], weights_dir: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in metrics:
        if name in M.PAIRED_METRICS:
            vals = torch.cat([M.paired_metric(name, weights_dir)(pred[i : i + 8], ref[i : i + 8]) for i in range(0, len(pred), 8)])
            out[name] = float(vals.mean())
            out[name + "_per_image"] = [round(float(v), 5) for v in vals]
        elif len(pred) >= 2:
            out[name] = M.set_metric(name, pred, ref, weights_dir)
    return out


def load_eval_set(data: CalibrationSet, size: int, limit: int | None, batch_size: int,
                  upscale: int = 1) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(LQ model-input batches at ``size`` in [-1, 1], LQ for the "LQ input" row in [0, 1], HQ in [0, 1]).

    For a super-resolution model (``upscale`` > 1) HQ is loaded at ``size·upscale`` and the "LQ input"
    row is the LQ bicubic-upscaled to that size (torch, a = −0.75). Raises InputError when the set's task
    (its HQ/LQ scale) does not match ``upscale``."""
    data.check_for(upscale)
    lq_batches = data.batches(size, batch_size, limit=limit)
    hq = (torch.cat(data.batches(size * upscale, batch_size, limit=limit, which="hq")) + 1) / 2
    lq = torch.cat(lq_batches)
    if upscale > 1:
        lq = torch.nn.functional.interpolate(lq, scale_factor=upscale, mode="bicubic", align_corners=False).clamp(-1, 1)
    return lq_batches, (lq + 1) / 2, hq


def _quiet_rank() -> bool:
    """A rank other than 0 under torchrun: its progress bar would repeat rank 0's."""
    from toolchain import distributed as D

    return D.quiet_rank()
