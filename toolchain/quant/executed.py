"""The executed recipe: a QuantConfig completed with what a method decided from data.

A method may choose bits from data (QuantFace's 8-bit activations for widths without a Hadamard matrix)
or leave a layer float; ``record_method_decisions`` writes those choices back into the config as
exact-name rules, so the config alone says which layers are quantized at which bits. ``quantize_``
calls it after the method and ``save_quantized`` before writing, and the checkpoint loader rebuilds
from the stored config.
"""

from __future__ import annotations

import re

import torch

from toolchain.quant.calibrate import quant_layers
from toolchain.quant.config import LayerRule, QuantConfig, quantizable_layers
def record_method_decisions(model: torch.nn.Module, config: QuantConfig) -> list[str]:
    """Append to ``config.rules`` one exact-name rule (``^path$``) per quantized layer whose executed
    (weight, activation) bits differ from what ``config`` selects, and a skip rule per layer the config
    selects that stayed float; returns the rule patterns added (empty when the recipe already says it all).

    Raises ValueError for a quantized layer the config's scope excludes, or one with a tensor left
    unquantized while the other is quantized (neither can be written as a rule)."""
    added: list[str] = []
    done = dict(quant_layers(model))
    for name, layer in done.items():
        specs = config.layer_specs(name)
        have = (layer.w_bits, layer.a_bits)
        want = (specs[0].bits, specs[1].bits) if specs is not None else None
        if have == want:
            continue
        if want is None or None in have:
            raise ValueError(f"layer {name}: executed bits {have} cannot be written as a recipe rule (recipe: {want})")
        pattern = f"^{re.escape(name)}$"
        config.rules.append(LayerRule(pattern, have[0] if have[0] != want[0] else None, have[1] if have[1] != want[1] else None))
        added.append(pattern)
    for name, _ in quantizable_layers(model):
        inside = any(name.startswith(q + ".") for q in done)  # a quantized layer's own branch/transform modules
        if name not in done and not inside and config.layer_specs(name) is not None:
            pattern = f"^{re.escape(name)}$"
            config.rules.append(LayerRule(pattern, skip=True))
            added.append(pattern)
    return added
