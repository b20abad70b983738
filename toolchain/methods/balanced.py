"""Methods built on channel balancing: SmoothQuant (scale only) and QuantFace.

QuantFace here is the paper's recipe in stages, each switchable for ablations:
rotation-scaling balancing (``balance``, ``alpha``) → [low-rank compensation, QD-LoRA, mixed
precision: added by their own modules] → static calibration of every quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from toolchain.balance.stats import collect_input_absmax
from toolchain.balance.transform import BalanceConfig, apply_balancing, balance_report, plan_balancing
from toolchain.methods.registry import MethodContext, QuantMethod, register_method
from toolchain.quant.calibrate import calibrate_activations, calibrate_weights, prepare_model, quant_layers, quantizers_off
from toolchain.quant.config import QuantConfig
from toolchain.quant.quantizer import FakeQuantizer


def balance_model(model, ctx: MethodContext, bcfg: BalanceConfig) -> dict[str, Any]:
    """Collect channel statistics, fold the balancing transforms, raise bits of unrotatable layers."""
    layers = dict(quant_layers(model))
    with quantizers_off(model):
        absmax = collect_input_absmax(model, layers, ctx.lq_batches)
        plans = plan_balancing(model, layers, absmax, bcfg, batches=ctx.lq_batches[:2])
        apply_balancing(model, plans)
    report = balance_report(plans, bcfg)
    if bcfg.fallback_a_bits:
        for name in report.unrotated:
            layer = layers[name]
            if layer.input_quantizer is not None and layer.input_quantizer.bits < bcfg.fallback_a_bits:
                layer.input_quantizer = FakeQuantizer(layer.input_quantizer.spec.with_bits(bcfg.fallback_a_bits)).to(layer.weight.device)
    return report.to_dict()


def calibrate(model, ctx: MethodContext) -> int:
    calibrate_weights(model)
    return calibrate_activations(model, ctx.lq_batches, state_dir=ctx.state_dir("calib"))


@dataclass
class SmoothQuantParams:
    alpha: float = 0.5


@register_method
class SmoothQuant(QuantMethod):
    name = "smoothquant"
    Params = SmoothQuantParams
    summary_doc = "per-channel scales s = max|X|^α / max|W|^(1−α) folded into weights (online scale where needed)"

    def apply(self, model, config: QuantConfig, ctx: MethodContext) -> dict[str, Any]:
        layers = prepare_model(model, config)
        bal = balance_model(model, ctx, BalanceConfig(mode="scale", alpha=self.params.alpha, seed=ctx.seed))
        n = calibrate(model, ctx)
        return {"quantized_layers": len(layers), "balance": bal, "calibration_batches": n}


@dataclass
class QuantFaceParams:
    balance: str = "rotate-scale"  # none | scale | rotate | rotate-scale | auto (per-layer choice by output error)
    alpha: float = 0.5
    fallback_a_bits: int = 8  # activations of layers whose channel count has no Hadamard matrix


@register_method
class QuantFace(QuantMethod):
    name = "quantface"
    Params = QuantFaceParams
    summary_doc = "rotation-scaling channel balancing (randomized Hadamard + scales), then static calibration"

    def apply(self, model, config: QuantConfig, ctx: MethodContext) -> dict[str, Any]:
        layers = prepare_model(model, config)
        bcfg = BalanceConfig(mode=self.params.balance, alpha=self.params.alpha, seed=ctx.seed, fallback_a_bits=self.params.fallback_a_bits)
        bal = balance_model(model, ctx, bcfg)
        n = calibrate(model, ctx)
        return {"quantized_layers": len(layers), "balance": bal, "calibration_batches": n}
