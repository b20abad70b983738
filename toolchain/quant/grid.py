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


def along_axis(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """A per-channel vector (C,) reshaped to broadcast along ``axis`` of an ``ndim``-dimensional tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def broadcast_shape(t: torch.Tensor, like: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along ``axis`` of ``like`` (a 1-element one to a scalar)."""
    return t.reshape(()) if t.numel() == 1 else along_axis(t, like.dim(), axis)
