"""Per-input-channel activation statistics of quantized layers.

One pass over the calibration batches with forward pre-hooks records max|X_c| for every input
channel c of every selected layer (the channel axis is 1 for convs, last for linears). Only a
running maximum per channel is kept, so memory is O(channels) and the pass streams batches of
any size on CPU or GPU.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


def channel_axis(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.Conv2d) else -1


def channel_absmax(x: torch.Tensor, axis: int) -> torch.Tensor:
    x = x.detach().float().movedim(axis, -1)
    return x.abs().reshape(-1, x.shape[-1]).amax(dim=0)


def collect_input_absmax(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[torch.Tensor],
                         forward=None, desc: str = "channel statistics") -> dict[str, torch.Tensor]:
    """max|X_c| per input channel of each layer in ``layers`` over all batches (CPU tensors)."""
    stats: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str, module: nn.Module):
        axis = channel_axis(module)

        def hook(mod, args):
            cur = channel_absmax(args[0], axis)
            prev = stats.get(name)
            stats[name] = cur if prev is None else torch.maximum(prev, cur)

        return hook

    for name, module in layers.items():
        handles.append(module.register_forward_pre_hook(make_hook(name, module)))
    forward = forward or model
    device = next(model.parameters()).device
    batches = list(batches)
    try:
        with torch.no_grad():
            for b in tqdm(batches, desc=desc, leave=False, disable=_quiet_rank()):
                forward(b.to(device))
    finally:
        for h in handles:
            h.remove()
    return {k: v.cpu() for k, v in stats.items()}


def weight_input_absmax(weight: torch.Tensor) -> torch.Tensor:
    """max|W| over everything but the input-channel axis (axis 1)."""
    return weight.detach().float().abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(dim=1)


def _quiet_rank() -> bool:
    """A rank other than 0 under torchrun: its progress bar would repeat rank 0's."""
    from toolchain import distributed as D

    return D.quiet_rank()
