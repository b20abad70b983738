"""Helpers shared by the allocation stages: re-deriving activation quantizers at other bit-widths."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from toolchain.quant.layers import QuantLayerMixin
from toolchain.quant.quantizer import FakeQuantizer, qparams_from_range


def activation_range(q: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibrated real range [lo, hi] a per-tensor activation quantizer covers."""
    s, z = q.scale.detach().reshape(-1)[0], q.zero_point.detach().reshape(-1)[0]
    return (q.spec.qmin - z) * s, (q.spec.qmax - z) * s


def quantizer_at_bits(q: FakeQuantizer, bits: int) -> FakeQuantizer:
    """A copy of ``q`` over the same calibrated range with ``bits`` levels (the paper's Q_b)."""
    spec = q.spec.with_bits(bits)
    lo, hi = activation_range(q)
    new = FakeQuantizer(spec).to(q.scale.device)
    new.set_qparams(*qparams_from_range(lo, hi, spec))
    return new


@contextlib.contextmanager
def swapped_input_quantizer(layer: QuantLayerMixin, q: FakeQuantizer | None) -> Iterator[None]:
    saved = layer.input_quantizer
    layer.input_quantizer = q
    try:
        yield
    finally:
        layer.input_quantizer = saved


def activation_layers(model: torch.nn.Module) -> dict[str, QuantLayerMixin]:
    from toolchain.quant.calibrate import quant_layers

    return {name: layer for name, layer in quant_layers(model) if layer.input_quantizer is not None}
