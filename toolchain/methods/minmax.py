"""MinMax: the plain post-training baseline (per-channel weight, per-tensor activation ranges)."""

from __future__ import annotations

from typing import Any

from toolchain.quant.registry import MethodContext, QuantMethod, register_method
from toolchain.quant.calibrate import calibrate_activations, calibrate_weights, prepare_model
from toolchain.quant.config import QuantConfig


def standard_ptq(model, config: QuantConfig, ctx: MethodContext, stage: str = "calib") -> dict[str, Any]:
    """Wrap layers, set weight scales, observe activations, freeze — the common PTQ tail."""
    layers = prepare_model(model, config)
    calibrate_weights(model)
    n = calibrate_activations(model, ctx.lq_batches, state_dir=ctx.state_dir(stage))
    return {"quantized_layers": len(layers), "calibration_batches": n}


@register_method
class MinMax(QuantMethod):
    name = "minmax"
    summary_doc = "per-channel weight / per-tensor activation min-max ranges, no transforms"

    def apply(self, model, config: QuantConfig, ctx: MethodContext) -> dict[str, Any]:
        return standard_ptq(model, config, ctx)
