"""``quantize_(model, config, ctx)``: the one verb every method goes through."""

from __future__ import annotations

import re
import time
from typing import Any

import torch

from toolchain.quant.calibrate import quant_layers
from toolchain.quant.config import LayerRule, QuantConfig, quantizable_layers
from toolchain.quant.registry import MethodContext, get_method


def quantize_(model: torch.nn.Module, config: QuantConfig, ctx: MethodContext) -> dict[str, Any]:
    """Quantize ``model`` in place with ``config.method``; returns the method's summary plus timing.

    A model with a constant prompt (``fold_constant_prompt``: OSEDiff) then has its prompt-only projections
    (cross-attention k/v, outside the quantization scope) replaced by their constant outputs; the summary
    counts them as ``constant_prompt_folded`` and checkpoints store the constants.

    ``config`` is completed in place into the recipe that was executed: what the method decided from
    data (QuantFace's 8-bit activations for widths without a Hadamard matrix, PassionSR's 8-bit
    first/last layers, …) is appended as exact-name rules (``record_method_decisions``), so
    ``config.layer_specs`` gives every layer's executed bits and the checkpoint loader can rebuild
    from the stored config."""
    method = get_method(config.method, config.params)
    torch.manual_seed(ctx.seed)
    start = time.perf_counter()
    model.to(ctx.device).eval()
    summary = method.apply(model, config, ctx)
    fold = getattr(model, "fold_constant_prompt", None)
    if fold is not None:
        summary["constant_prompt_folded"] = fold()
    decided = record_method_decisions(model, config)
    if decided:
        summary["method_rules"] = decided
    summary = {"method": config.method, "bits": config.bits_label, **summary, "seconds": round(time.perf_counter() - start, 2)}
    model.eval()
    return summary


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
