"""Trainable stand-ins for the fake quantizers, used while a method calibrates, then frozen back.

The baselines learn different quantization parameters — clipping bounds (PassionSR's LBQ), step
sizes (LSQ: EfficientDM, QArtSR) or the rounding direction of every weight (AdaRound:
Q-Diffusion). Each is trained in a form that suits gradient descent and then turned back into a
plain :class:`FakeQuantizer` (scale + integer zero point), so the checkpoint format and both
exporters never see anything new.
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.quant.calibrate import quant_layers
from toolchain.quant.quantizer import _EPS, FakeQuantizer, QuantSpec, broadcast_shape, fake_quantize, qparams_from_range, round_ste


class BoundQuantizer(nn.Module):
    """Activation quantizer parametrised by learnable clipping bounds [lo, hi] (PassionSR's LBQ).

    scale = (hi − lo)/(q_max − q_min), zero point = round(q_min − lo/scale) with a straight-through
    round, so gradients reach both bounds through the scale and the clamp.
    """

    def __init__(self, q: FakeQuantizer):
        super().__init__()
        if q.spec.per_channel:
            raise ValueError("learnable bounds are per-tensor")
        self.spec = q.spec
        scale, zero = q.scale.detach().reshape(()), q.zero_point.detach().reshape(())
        self.lo = nn.Parameter((q.spec.qmin - zero) * scale)
        self.hi = nn.Parameter((q.spec.qmax - zero) * scale)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        if spec.symmetric:
            scale = torch.clamp(torch.maximum(-self.lo, self.hi) / spec.qmax, min=_EPS)
            return scale, torch.zeros_like(scale)
        scale = torch.clamp((self.hi - self.lo) / (spec.qmax - spec.qmin), min=_EPS)
        zero = torch.clamp(round_ste(spec.qmin - self.lo / scale), spec.qmin, spec.qmax)
        return scale, zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self.qparams()
        return fake_quantize(x, scale, zero, self.spec.qmin, self.spec.qmax)

    def to_fake_quantizer(self) -> FakeQuantizer:
        q = FakeQuantizer(self.spec).to(self.lo.device)
        with torch.no_grad():
            scale, zero = self.qparams()
            q.set_qparams(scale.detach(), torch.round(zero.detach()))
        return q


class AdaRoundQuantizer(nn.Module):
    """Weight quantizer with a learned rounding direction per weight (AdaRound).

    W̃ = s·clamp(⌊W/s⌋ + h(V), q_min, q_max) with the rectified sigmoid h(V) ∈ [0, 1]; V starts
    where h(V) equals the fractional part, so the first forward reproduces the float weight inside
    the clipping range. ``regularizer(β)`` pushes every h(V) to 0 or 1.
    """

    ZETA, GAMMA = 1.1, -0.1

    def __init__(self, q: FakeQuantizer, weight: torch.Tensor):
        super().__init__()
        if not q.spec.symmetric:
            raise ValueError("AdaRound here assumes symmetric weight quantization")
        self.spec = q.spec
        scale = broadcast_shape(q.scale.detach().clamp(min=_EPS), weight, q.axis)
        self.register_buffer("step", scale.clone())
        w = weight.detach() / scale
        self.register_buffer("w_floor", torch.floor(w))
        rest = (w - self.w_floor).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(-torch.log((self.ZETA - self.GAMMA) / (rest - self.GAMMA) - 1))

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (self.ZETA - self.GAMMA) + self.GAMMA, 0, 1)

    def forward(self, _weight: torch.Tensor | None = None, hard: bool = False) -> torch.Tensor:
        frac = (self.v >= 0).to(self.v) if hard else self.h()
        return self.step * torch.clamp(self.w_floor + frac, self.spec.qmin, self.spec.qmax)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def learn_step_sizes(quantizers: list[FakeQuantizer]) -> dict[str, nn.Parameter]:
    """Make each quantizer's scale a Parameter (LSQ); returns them keyed by position."""
    params = {}
    for i, q in enumerate(quantizers):
        q.make_learnable()
        params[f"q{i}.scale"] = q.scale
    return params


def freeze_step_sizes(model: nn.Module) -> int:
    """Turn every learnable scale back into a buffer (clamped positive); returns how many."""
    n = 0
    for _, layer in quant_layers(model):
        for q in (layer.weight_quantizer, layer.input_quantizer):
            if q is not None and isinstance(q.scale, nn.Parameter):
                value = q.scale.detach().clamp(min=_EPS).clone()
                del q.scale
                q.register_buffer("scale", value)
                n += 1
    return n


def activation_quantizers(layers: list[nn.Module]) -> list[FakeQuantizer]:
    return [layer.input_quantizer for layer in layers if isinstance(layer.input_quantizer, FakeQuantizer)]


def weight_quantizers(layers: list[nn.Module]) -> list[FakeQuantizer]:
    return [layer.weight_quantizer for layer in layers if isinstance(layer.weight_quantizer, FakeQuantizer)]


def group_activation_ranges(q: FakeQuantizer, split: int) -> None:
    """Collapse a per-channel activation quantizer's observed ranges into two groups [0, split) and
    [split, C) — Q-Diffusion's split quantizer for a concatenation of two differently-scaled inputs."""
    obs = q.observer
    lo, hi = obs.lo.clone(), obs.hi.clone()
    spec: QuantSpec = q.spec
    for sl in (slice(0, split), slice(split, lo.numel())):
        lo[sl], hi[sl] = lo[sl].min(), hi[sl].max()
    q.set_qparams(*qparams_from_range(lo, hi, spec))
    q.observer = None
    q.mode = "quantize"
