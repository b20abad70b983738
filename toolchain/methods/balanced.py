"""Methods built on channel balancing: SmoothQuant (scale only) and QuantFace.

QuantFace here is the paper's recipe in stages, each switchable for ablations:
rotation-scaling balancing (``balance``, ``alpha``) → [low-rank compensation, QD-LoRA, mixed
precision: added by their own modules] → static calibration of every quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from toolchain.balance.stats import collect_input_absmax
from toolchain.errors import ConfigError
from toolchain.balance.transform import BalanceConfig, apply_balancing, balance_report, plan_balancing
from toolchain.quant.registry import MethodContext, QuantMethod, register_method
from toolchain.quant.calibrate import calibrate_activations, calibrate_weights, prepare_model, quant_layers, quantizers_off
from toolchain.quant.config import QuantConfig
from toolchain.quant.kinds import observer_for, parse_kind_observers, parse_observer
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
    recipe: str = "default"  # a named preset of the fields below (RECIPES); parameters given explicitly override it
    # activation observer per layer kind: KIND=OBSERVER items (toolchain.quant.kinds), '*' = the rest. Default: the best
    # observer per kind measured at A4 on `ref` (benchmarks/results/w4a4_analysis_ref, stage b)
    observers: tuple[str, ...] = ("unet.attn_proj=mse", "unet.ff=mse", "*=percentile:99.9")
    # the observers apply to layers whose activations have at most this many bits (clipping pays at A4, where it
    # was measured; at A8 the min-max grid is fine enough and clipping costs: osediff-tiny W8A8 error 0.028 → 0.052)
    observer_max_bits: int = 4
    balance: str = "auto"  # none | scale | rotate | rotate-scale | auto (per-layer choice by output error)
    alpha: float = 0.5
    fallback_a_bits: int = 8  # activations of layers whose channel count has no Hadamard matrix
    svd_rank: int = 8  # tied SVD branch (0: none)
    lora_rank: int = 8  # QD-LoRA's second branch (0: train the SVD branch alone)
    rank_ratio: float = 0.0  # > 0: both ranks become this fraction of each layer's smaller dimension
    lora_into_residual: bool = False  # variant: A·B inside the low-bit weight, only the SVD branch stays 16-bit
    train_steps: int = 200  # QD-LoRA distillation steps (0: no training)
    lr: float = 1e-5
    lpips_weights: str | None = None  # alexnet-owt-7be5be79.pth (file or folder); else ST-LPIPS substitute
    w_perceptual: float = 0.5
    w_mse: float = 0.5
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50
    merge: bool = True  # concatenate the branches into one rank-(r1+r2) branch after training

    def __post_init__(self) -> None:
        if self.svd_rank < 0 or self.lora_rank < 0 or self.train_steps < 0:
            raise ValueError("ranks and train_steps must be >= 0")
        parse_kind_observers(self.observers)


# Named QuantFace recipes: each fixes the fields it names, as JSON values (explicit parameters win).
# "paper": the settings of the QuantFace paper as this toolchain implemented them before the W4A4
# analysis (rotation-scaling on every layer, SVD + LoRA rank 8 each, min-max activation ranges).
# "default": the dataclass defaults, the best settings measured in benchmarks/results/w4a4_analysis_ref/
# (balance=auto, per-kind observers: 28.4 dB vs FP at W4A4 without distillation, against 19.4 for "paper").
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"balance": "rotate-scale", "alpha": 0.5, "observers": [], "svd_rank": 8, "lora_rank": 8, "rank_ratio": 0.0},
    "default": {},
}


def apply_observers(model, mapping: dict[str, str], max_bits: int | None = None) -> dict[str, str]:
    """Give each quantized layer's input quantizer the observer ``mapping`` names for its kind
    (``toolchain.quant.kinds``; ``*`` for every other kind); layers of unnamed kinds keep theirs, and so do
    layers with more than ``max_bits`` activation bits (None: no limit). Call before calibration.
    Returns {layer: observer} for the layers changed."""
    changed = {}
    for name, layer in quant_layers(model):
        obs = observer_for(name, mapping)
        q = layer.input_quantizer
        if obs is None or q is None or (max_bits is not None and q.spec.bits > max_bits):
            continue
        spec = parse_observer(obs, q.spec)
        if spec != q.spec:
            layer.input_quantizer = FakeQuantizer(spec, q.scale.numel(), q.axis).to(layer.weight.device)
            changed[name] = obs
    return changed


@register_method
class QuantFace(QuantMethod):
    name = "quantface"
    Params = QuantFaceParams
    summary_doc = ("rotation-scaling balancing + QD-LoRA (SVD branch + LoRA, distilled) + static calibration; "
                   f"recipe={'|'.join(RECIPES)} presets the rest")

    def __init__(self, params: dict[str, Any] | None = None, labels: dict[str, str] | None = None):
        params = dict(params or {})
        recipe = params.get("recipe", "default")
        if not isinstance(recipe, str) or recipe not in RECIPES:
            raise ConfigError(f"parameter 'recipe' = {recipe!r}: expected one of {', '.join(RECIPES)}")
        super().__init__({**RECIPES[recipe], **params}, labels)

    def apply(self, model, config: QuantConfig, ctx: MethodContext) -> dict[str, Any]:
        from toolchain.lowrank.compensate import attach_branches, merge_all, train_branches

        p = self.params
        layers = prepare_model(model, config)
        observers = apply_observers(model, parse_kind_observers(p.observers), p.observer_max_bits) if p.observers else {}
        bcfg = BalanceConfig(mode=p.balance, alpha=p.alpha, seed=ctx.seed, fallback_a_bits=p.fallback_a_bits)
        summary: dict[str, Any] = {"quantized_layers": len(layers), "recipe": p.recipe, "balance": balance_model(model, ctx, bcfg)}
        if observers:
            summary["observers"] = {obs: sum(1 for v in observers.values() if v == obs) for obs in sorted(set(observers.values()))}
        branched = attach_branches(model, p.svd_rank, p.lora_rank, ctx.seed, p.lora_into_residual, rank_ratio=p.rank_ratio)
        summary["calibration_batches"] = calibrate(model, ctx)
        summary["lowrank"] = {"layers": branched, "svd_rank": p.svd_rank, "lora_rank": p.lora_rank, "rank_ratio": p.rank_ratio,
                              "lora_into_residual": p.lora_into_residual}
        if branched and p.train_steps > 0:
            parts = ("svd", "lora") if p.lora_rank > 0 else ("svd",)
            summary["qdlora"] = train_branches(model, ctx.lq_batches, ctx.state_dir("qdlora"), p.train_steps, p.lr, ctx.seed, ctx.device,
                                               p.lpips_weights, p.w_perceptual, p.w_mse, p.gradient_checkpointing, p.checkpoint_every, parts)
        if branched and p.merge:
            summary["lowrank"]["merged_layers"] = merge_all(model)
        return summary
