"""``quantize_(model, config, ctx)``: the one verb every method goes through."""

from __future__ import annotations

import time
from typing import Any

import torch

from toolchain.quant.config import QuantConfig
from toolchain.quant.executed import record_method_decisions
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

