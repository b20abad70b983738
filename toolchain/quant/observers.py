"""Observers turn seen tensors into quantization ranges.

* ``minmax``     – running min/max (per tensor or per channel).
* ``percentile`` – mean over batches of the lower/upper percentile (robust to rare outliers).
* ``mse``        – keeps min/max plus a reservoir sample of values and grid-searches the clipping
                   range that minimises the quantization MSE on that sample.

Observers are modules with buffers only, so a calibration run can checkpoint them with
``state_dict`` and resume after an interruption.
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.quant.grid import QuantSpec, fake_quantize, qparams_from_range

_SUBSAMPLE = 1 << 20
_RESERVOIR = 1 << 16
_MSE_GRID = torch.linspace(0.30, 1.0, 36)


def _per_channel_view(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x.transpose(0, axis).reshape(x.shape[axis], -1)


class MinMaxObserver(nn.Module):
    def __init__(self, channels: int = 1, axis: int = 0):
        super().__init__()
        self.axis = axis
        self.register_buffer("lo", torch.full((channels,), float("inf")))
        self.register_buffer("hi", torch.full((channels,), float("-inf")))

    def has_data(self) -> bool:
        return bool(torch.isfinite(self.lo).all())

    def update(self, x: torch.Tensor) -> None:
        x = x.float()
        if self.lo.numel() == 1:
            lo, hi = x.min().reshape(1), x.max().reshape(1)
        else:
            v = _per_channel_view(x, self.axis)
            lo, hi = v.min(dim=1).values, v.max(dim=1).values
        self.lo.copy_(torch.minimum(self.lo, lo.to(self.lo)))
        self.hi.copy_(torch.maximum(self.hi, hi.to(self.hi)))

    def compute_qparams(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams_from_range(self.lo, self.hi, spec)


class PercentileObserver(nn.Module):
    """Per-tensor only: averages each batch's percentile range (streaming, bounded memory)."""

    def __init__(self, percentile: float, channels: int = 1, axis: int = 0):
        super().__init__()
        if channels != 1:
            raise ValueError("the percentile observer is per-tensor only")
        self.q = percentile / 100.0
        self.register_buffer("lo_sum", torch.zeros(1, dtype=torch.float64))
        self.register_buffer("hi_sum", torch.zeros(1, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(1, dtype=torch.float64))

    def has_data(self) -> bool:
        return bool(self.count.item() > 0)

    def update(self, x: torch.Tensor) -> None:
        v = x.detach().float().reshape(-1)
        if v.numel() > _SUBSAMPLE:
            idx = torch.randint(0, v.numel(), (_SUBSAMPLE,), generator=torch.Generator().manual_seed(int(self.count.item())), device="cpu")
            v = v[idx.to(v.device)]
        lo, hi = torch.quantile(v, torch.tensor([1.0 - self.q, self.q], device=v.device))
        self.lo_sum += lo.double().cpu()
        self.hi_sum += hi.double().cpu()
        self.count += 1

    def compute_qparams(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        lo = (self.lo_sum / self.count).float()
        hi = (self.hi_sum / self.count).float()
        return qparams_from_range(lo, hi, spec)


class MSEObserver(nn.Module):
    """Searches a shrink factor of the min/max range that minimises quantization MSE."""

    def __init__(self, channels: int = 1, axis: int = 0):
        super().__init__()
        self.axis = axis
        self.minmax = MinMaxObserver(channels, axis)
        self.per_channel = channels > 1
        self.register_buffer("sample", torch.zeros(0))
        self.register_buffer("seen", torch.zeros(1, dtype=torch.float64))

    def has_data(self) -> bool:
        return self.minmax.has_data()

    def update(self, x: torch.Tensor) -> None:
        self.minmax.update(x)
        if self.per_channel:  # weights: observed once, keep the whole tensor
            self.sample = _per_channel_view(x.detach().float(), self.axis).cpu()
            return
        v = x.detach().float().reshape(-1).cpu()
        # Reservoir-style: keep a uniform random subset of everything seen, of bounded size.
        gen = torch.Generator().manual_seed(int(self.seen.item()) % (2**31))
        keep = min(v.numel(), _RESERVOIR)
        pick = v[torch.randperm(v.numel(), generator=gen)[:keep]]
        seen_before = self.seen.item()
        self.seen += v.numel()
        if self.sample.numel() < _RESERVOIR:
            self.sample = torch.cat([self.sample, pick])[:_RESERVOIR]
        else:
            frac = v.numel() / (seen_before + v.numel())
            n_replace = int(round(frac * _RESERVOIR))
            if n_replace:
                slots = torch.randperm(_RESERVOIR, generator=gen)[:n_replace]
                self.sample[slots] = pick[torch.randint(0, keep, (n_replace,), generator=gen)]

    def compute_qparams(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.minmax.lo.cpu(), self.minmax.hi.cpu()
        data = self.sample if self.per_channel else self.sample.reshape(1, -1)
        best_err = torch.full((lo.numel(),), float("inf"))
        best = qparams_from_range(lo, hi, spec)
        for r in _MSE_GRID:
            scale, zero = qparams_from_range(lo * r, hi * r, spec)
            deq = fake_quantize(data, scale.reshape(-1, 1), zero.reshape(-1, 1), spec.qmin, spec.qmax)
            err = (deq - data).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]))
        return best[0].to(self.minmax.lo.device), best[1].to(self.minmax.lo.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # sample size varies
        key = prefix + "sample"
        if key in state_dict:
            self.sample = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def make_observer(spec: QuantSpec, channels: int, axis: int) -> nn.Module:
    if spec.observer == "minmax":
        return MinMaxObserver(channels, axis)
    if spec.observer == "percentile":
        if channels > 1:
            return MinMaxObserver(channels, axis)  # per-channel weights: percentile makes no sense
        return PercentileObserver(spec.percentile)
    return MSEObserver(channels, axis)
