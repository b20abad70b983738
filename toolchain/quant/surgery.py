"""Model surgery for fake quantization: swap float layers for their quantized twins, find them, switch their quantizers.

Calibration (``toolchain.quant.calibrate``) and every method build on these; they change the module tree or
the quantizers' modes, never a scale or a weight.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from toolchain.quant.config import QuantConfig, quantizable_layers
from toolchain.quant.layers import QUANT_LAYER_TYPES, QuantLayerMixin, is_quant_layer


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def prepare_model(model: nn.Module, config: QuantConfig) -> list[str]:
    """Replace every in-scope Conv2d/Linear by its quantized twin (in place); return their names."""
    replaced = []
    for name, module in list(quantizable_layers(model)):
        if is_quant_layer(module):
            continue
        specs = config.layer_specs(name)
        if specs is None:
            continue
        qcls = QUANT_LAYER_TYPES.get(type(module))
        if qcls is None:
            continue
        set_submodule(model, name, qcls.from_float(module, *specs))
        replaced.append(name)
    return replaced


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayerMixin]]:
    for name, module in model.named_modules():
        if is_quant_layer(module):
            yield name, module


def set_quant_mode(model: nn.Module, weights: str | None = None, activations: str | None = None) -> None:
    """Switch all quantizers: mode is 'quantize' or 'off' (None leaves that side unchanged)."""
    for _, layer in quant_layers(model):
        if weights is not None and layer.weight_quantizer is not None:
            layer.weight_quantizer.mode = weights
        if activations is not None and layer.input_quantizer is not None:
            layer.input_quantizer.mode = activations


@contextlib.contextmanager
def quantizers_off(model: nn.Module) -> Iterator[None]:
    """Temporarily run every quantizer as identity (restoring each one's mode afterwards)."""
    saved = [(q, q.mode) for _, layer in quant_layers(model) for q in (layer.weight_quantizer, layer.input_quantizer) if q is not None]
    for q, _ in saved:
        q.mode = "off"
    try:
        yield
    finally:
        for q, mode in saved:
            q.mode = mode
