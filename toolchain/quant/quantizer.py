"""Uniform affine fake quantization with a straight-through estimator.

    q = clamp(round(x / s) + z, q_min, q_max)        x̂ = s · (q − z)

Weights: per output channel, symmetric, narrow range [−(2^(b−1)−1), 2^(b−1)−1] (the ranges
LiteRT's int8/int4 weight kernels use). Activations: per tensor, asymmetric [0, 2^b − 1] with an
integer zero point, or symmetric narrow range (int16 on LiteRT must be symmetric). The round
passes gradients straight through, so the same function serves calibration, QAT-style training
and LSQ (learnable step size) — the gradient w.r.t. ``s`` falls out of autograd.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from toolchain.errors import ConfigError

OBSERVERS = ("minmax", "percentile", "mse")
_EPS = 1e-8


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. Serialises to a flat JSON dict."""

    bits: int
    symmetric: bool = False
    per_channel: bool = False
    observer: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ConfigError(f"bits must be an integer in 2..16, got {self.bits!r}")
        if self.observer not in OBSERVERS:
            raise ConfigError(f"unknown observer '{self.observer}' (choose from {', '.join(OBSERVERS)})")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def with_bits(self, bits: int) -> "QuantSpec":
        return QuantSpec(bits, self.symmetric, self.per_channel, self.observer, self.percentile)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"invalid quantization spec {d}: {exc}") from None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize ``x``; ``scale``/``zero_point`` broadcast against it.

    The reference autograd formulation (gradients for x, scale and zero point); FakeQuantizer uses
    ``fake_quantize_ste`` when neither qparam trains."""
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


class _FakeQuantSTE(torch.autograd.Function):
    """``fake_quantize`` with frozen qparams as one autograd node that saves a 1-byte mask.

    Forward is the same float arithmetic (x / s, round half to even, + z, clamp, − z, · s), so
    results are bit-identical; backward is the straight-through gradient of the reference graph,
    (g · s) / s strictly inside (qmin, qmax) — torch.clamp's gradient is 0 at the bounds — and 0
    elsewhere. The reference graph keeps a float32 copy of the clamp input per quantizer for backward
    (4 bytes per element) and more elementwise kernels; this keeps a bool mask.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):
        t = torch.round(x / scale)
        if zero_point is not None:  # None: symmetric grid, z = 0 (two kernels fewer)
            t.add_(zero_point)
        # torch.clamp's gradient is zero *at* the bounds too (strict), so the reference STE passes
        # gradient only strictly inside (qmin, qmax); keep that
        mask = (t > qmin).logical_and_(t < qmax)
        q = t.clamp_(qmin, qmax)
        ctx.save_for_backward(mask, scale)
        ctx.x_dtype = x.dtype
        if zero_point is not None:
            q.sub_(zero_point)
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, g):
        mask, scale = ctx.saved_tensors
        gx = (g * scale).div_(scale).mul_(mask)
        return gx.to(ctx.x_dtype), None, None, None, None


def fake_quantize_ste(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int) -> torch.Tensor:
    """``fake_quantize`` for frozen ``scale`` / ``zero_point`` (no gradient to them): same values,
    same x-gradient, less memory and fewer kernels. x: any float tensor; scale, zero_point
    broadcastable float32 tensors (scale > 0; ``zero_point`` None for a symmetric grid, z = 0);
    qmin < qmax integers. Returns float32 (or x's dtype when wider), like the reference."""
    if not torch.is_grad_enabled() or not x.requires_grad:
        with torch.no_grad():
            t = torch.round(x / scale)
            if zero_point is None:
                return t.clamp_(qmin, qmax).mul_(scale)
            return t.add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
    return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax)


REFERENCE_PATH = False  # tests flip this to compare the fast path with the reference formulation


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering [lo, hi] (the range always includes 0)."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / spec.qmax
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        scale = torch.clamp(scale, min=_EPS)
        zero = torch.clamp(spec.qmin - torch.round(lo / scale), spec.qmin, spec.qmax)
    return torch.clamp(scale, min=_EPS), zero


def broadcast_shape(t: torch.Tensor, like: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along ``axis`` of ``like``."""
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * like.dim()
    shape[axis] = -1
    return t.reshape(shape)


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
