"""``FakeQuantizer``: a quantizer as a module (scale/zero point buffers, observe → freeze → quantize).

The grid itself — ``QuantSpec``, ``fake_quantize``, the straight-through estimator, ranges → scale and
zero point — is ``toolchain.quant.grid``; its names are re-exported here for the callers that import
them from this module. Observers (``toolchain.quant.observers``) build on the grid, not on this module.
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.quant.grid import (  # noqa: F401  (re-exported)
    _EPS, OBSERVERS, QuantSpec, broadcast_shape, fake_quantize, fake_quantize_ste, qparams_from_range, round_ste,  # noqa: F401
)

REFERENCE_PATH = False  # tests flip this to compare the fast path with the reference formulation



class FakeQuantizer(nn.Module):
    """A quantizer as a module: holds scale and zero point, observes during calibration.

    Modes: ``observe`` (record statistics, pass x through unchanged), ``quantize`` (fake-quantize
    with the frozen parameters) and ``off`` (identity, e.g. for sensitivity sweeps).
    """

    def __init__(self, spec: QuantSpec, channels: int = 1, axis: int = 0):
        super().__init__()
        self.spec = spec
        self.axis = axis
        n = channels if spec.per_channel else 1
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n))
        self.register_buffer("initialized", torch.tensor(False))
        self.mode = "quantize"
        self.observer: nn.Module | None = None
        # dynamic: recompute min-max parameters from every input (weights whose values train,
        # e.g. the residual W − L1·L2 of QD-LoRA); frozen again by calibrate_weight()
        self.dynamic = False

    @property
    def bits(self) -> int:
        return self.spec.bits

    def extra_repr(self) -> str:
        kind = "per-channel" if self.spec.per_channel else "per-tensor"
        sym = "sym" if self.spec.symmetric else "asym"
        return f"{self.spec.bits}-bit {kind} {sym} {self.spec.observer}, mode={self.mode}"

    def start_observing(self) -> None:
        from toolchain.quant.observers import make_observer

        if self.observer is None:
            self.observer = make_observer(self.spec, self.scale.numel(), self.axis)
        self.mode = "observe"

    def freeze(self) -> None:
        """Turn the observed statistics into scale/zero point and switch to quantize mode."""
        if self.observer is None or not self.observer.has_data():
            raise RuntimeError("quantizer has observed no data; run calibration first")
        scale, zero = self.observer.compute_qparams(self.spec)
        self.set_qparams(scale, zero)
        self.observer = None
        self.mode = "quantize"

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        with torch.no_grad():
            self.scale.copy_(scale.reshape(self.scale.shape).to(self.scale))
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape).to(self.zero_point))
            self.initialized.fill_(True)
        self._ready = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = None  # re-read ``initialized`` (once) at the next forward

    def _check_ready(self) -> None:
        # a host-side mirror of ``initialized``: reading the buffer on a GPU synchronises the device,
        # once per quantizer per forward (≈ 1400 stalls per SD-2.1 training step)
        ready = getattr(self, "_ready", None)
        if ready is None:
            ready = self._ready = bool(self.initialized)
        if not ready:
            raise RuntimeError("quantizer used before calibration")

    def _dynamic_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min-max qparams of ``x`` itself (dynamic mode), shaped to broadcast; also stored in the buffers."""
        with torch.no_grad():
            if self.spec.per_channel:
                v = x.detach().transpose(0, self.axis).reshape(x.shape[self.axis], -1)
                lo, hi = torch.aminmax(v, dim=1)
            else:
                lo, hi = torch.aminmax(x.detach())
                lo, hi = lo.reshape(1), hi.reshape(1)
            if self.spec.symmetric:
                # qparams_from_range's symmetric branch in 4 kernels instead of 11 (same values:
                # max(−min(lo, 0), max(hi, 0)) = max(−lo, hi, 0)); the zero point stays 0
                scale = torch.maximum(lo.neg(), hi).float().clamp_(min=0.0).div_(self.spec.qmax).clamp_(min=_EPS)
                self.scale.copy_(scale.reshape(self.scale.shape))
                self._ready = True
                return scale, None
            scale, zero = qparams_from_range(lo.float(), hi.float(), self.spec)
            self.scale.copy_(scale.reshape(self.scale.shape))
            self.zero_point.copy_(zero.reshape(self.zero_point.shape))
            self._ready = True
        return scale, zero

    def calibrate_weight(self, weight: torch.Tensor) -> None:
        """One-shot calibration from a static tensor (weights)."""
        self.dynamic = False
        self.start_observing()
        self.observer.update(weight.detach())
        self.freeze()

    def make_learnable(self) -> None:
        """Turn the scale into a trainable parameter (LSQ-style step size learning)."""
        if not isinstance(self.scale, nn.Parameter):
            scale = self.scale.detach().clone()
            del self.scale
            self.scale = nn.Parameter(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            self.observer.update(x.detach())
            return x
        if REFERENCE_PATH:
            return self._reference_forward(x)
        if self.dynamic:
            scale, zero = self._dynamic_qparams(x)
        else:
            self._check_ready()
            scale, zero = self.scale, self.zero_point
        if isinstance(self.scale, nn.Parameter) or isinstance(self.zero_point, nn.Parameter):
            scale = broadcast_shape(torch.clamp(scale, min=_EPS), x, self.axis)
            return fake_quantize(x, scale, broadcast_shape(zero, x, self.axis), self.spec.qmin, self.spec.qmax)
        with torch.no_grad():
            if not self.dynamic:  # dynamic scales are clamped where they are computed
                scale = torch.clamp(scale, min=_EPS)
            scale = broadcast_shape(scale, x, self.axis)
            zero = None if self.spec.symmetric else broadcast_shape(zero, x, self.axis)
        return fake_quantize_ste(x, scale, zero, self.spec.qmin, self.spec.qmax)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The original formulation (kept to test the fast path against)."""
        if self.dynamic:
            with torch.no_grad():
                if self.spec.per_channel:
                    v = x.detach().transpose(0, self.axis).reshape(x.shape[self.axis], -1)
                    lo, hi = v.min(dim=1).values, v.max(dim=1).values
                else:
                    lo, hi = x.detach().min().reshape(1), x.detach().max().reshape(1)
                self.set_qparams(*qparams_from_range(lo, hi, self.spec))
        if not bool(self.initialized):
            raise RuntimeError("quantizer used before calibration")
        scale = broadcast_shape(torch.clamp(self.scale, min=_EPS), x, self.axis)
        zero = broadcast_shape(self.zero_point, x, self.axis)
        return fake_quantize(x, scale, zero, self.spec.qmin, self.spec.qmax)
