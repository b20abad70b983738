"""Quantized Conv2d and Linear layers.

A quantized layer *is* its float layer (subclass, same ``weight``/``bias`` parameters and state
dict keys) with four optional parts that the techniques plug in:

    x ──input_transform──▶ x' ──input_quantizer──▶ Q(x') ─┐
                            │                              ├─ conv/linear with Q(W_res) ─▶ + ─▶ y
                            └────────── lowrank(x') ───────┘                               ▲
                                                             (low-rank branch, 16-bit) ────┘

* ``input_transform``: online rotation/scaling (Hadamard balancing); identity by default.
* ``input_quantizer`` / ``weight_quantizer``: FakeQuantizers (None = that side stays float).
* ``lowrank``: a low-rank branch module. It also decides what the quantizer sees
  (``adjust_quantized_weight``): for a tied SVD branch the residual W − L1·L2, recomputed from
  the current branch so training stays consistent.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.quant.quantizer import FakeQuantizer, QuantSpec


class QuantLayerMixin:
    """Shared forward logic; concrete classes provide ``_apply_weight``."""

    input_quantizer: FakeQuantizer | None
    weight_quantizer: FakeQuantizer | None
    input_transform: nn.Module
    lowrank: nn.Module | None

    def _init_quant(self, w_spec: QuantSpec | None, a_spec: QuantSpec | None) -> None:
        self.input_transform = nn.Identity()
        self.lowrank = None
        self.weight_quantizer = FakeQuantizer(w_spec, channels=self.weight.shape[0], axis=0) if w_spec else None
        self.input_quantizer = None
        if a_spec is not None and a_spec.per_channel:  # grouped activation ranges (Q-Diffusion's split quantizer)
            conv = isinstance(self, nn.Conv2d)
            self.input_quantizer = FakeQuantizer(a_spec, channels=self.weight.shape[1] * (self.groups if conv else 1), axis=1 if conv else -1)
        elif a_spec is not None:
            self.input_quantizer = FakeQuantizer(a_spec)

    @property
    def w_bits(self) -> int | None:
        return self.weight_quantizer.bits if self.weight_quantizer is not None else None

    @property
    def a_bits(self) -> int | None:
        return self.input_quantizer.bits if self.input_quantizer is not None else None

    def weight_to_quantize(self) -> torch.Tensor:
        """What the weight quantizer sees: W minus the tied low-rank part (SVD branch), plus any
        low-rank part that is merged into the quantized weight (QD-LoRA "merge" variant)."""
        if self.lowrank is None:
            return self.weight
        return self.lowrank.adjust_quantized_weight(self.weight)

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight_to_quantize()
        return self.weight_quantizer(w) if self.weight_quantizer is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_transform(x)
        xq = self.input_quantizer(x) if self.input_quantizer is not None else x
        y = self._apply_weight(xq, self.quantized_weight())
        if self.lowrank is not None:
            y = y + self.lowrank(x)
        return y

    def calibrate_weight(self) -> None:
        """(Re)compute the weight quantizer's scales from the current weight."""
        if self.weight_quantizer is not None:
            self.weight_quantizer.calibrate_weight(self.weight_to_quantize().detach())

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description from which the layer's structure can be rebuilt."""
        d: dict[str, Any] = {
            "kind": self.KIND,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "weight": self.weight_quantizer.spec.to_dict() if self.weight_quantizer is not None else None,
            "activation": self.input_quantizer.spec.to_dict() if self.input_quantizer is not None else None,
        }
        if self.input_quantizer is not None and bool(self.input_quantizer.initialized):
            d["act_scale"] = float(self.input_quantizer.scale.reshape(-1)[0])
            d["act_zero_point"] = float(self.input_quantizer.zero_point.reshape(-1)[0])
        if not isinstance(self.input_transform, nn.Identity):
            d["transform"] = self.input_transform.describe()
        if self.lowrank is not None:
            d["lowrank"] = self.lowrank.describe()
        return d


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    KIND = "conv2d"

    def _apply_weight(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, w, self.bias)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_spec: QuantSpec | None, a_spec: QuantSpec | None) -> "QuantConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta")
        q.weight = conv.weight
        q.bias = conv.bias
        q.train(conv.training)
        q._init_quant(w_spec, a_spec)
        return q.to(conv.weight.device)


class QuantLinear(QuantLayerMixin, nn.Linear):
    KIND = "linear"

    def _apply_weight(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, self.bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, w_spec: QuantSpec | None, a_spec: QuantSpec | None) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        q.weight = linear.weight
        q.bias = linear.bias
        q.train(linear.training)
        q._init_quant(w_spec, a_spec)
        return q.to(linear.weight.device)


QUANT_LAYER_TYPES: dict[type, type] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
QUANT_LAYERS = (QuantConv2d, QuantLinear)


def is_quant_layer(m: nn.Module) -> bool:
    return isinstance(m, QUANT_LAYERS)


def to_float_module(q: QuantLayerMixin) -> nn.Module:
    """A plain float layer with the same (untransformed) weight, for reference computations."""
    if isinstance(q, QuantConv2d):
        m = nn.Conv2d(q.in_channels, q.out_channels, q.kernel_size, q.stride, q.padding, q.dilation, q.groups, q.bias is not None, q.padding_mode, device="meta")
    else:
        m = nn.Linear(q.in_features, q.out_features, q.bias is not None, device="meta")
    m.weight, m.bias = q.weight, q.bias
    return m.to(q.weight.device)
