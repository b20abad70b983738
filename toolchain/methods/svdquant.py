"""SVDQuant baseline: smoothing with a searched α per layer, then a 16-bit low-rank branch that
absorbs the weight outliers, no training.

Follows the SVDQuant paper where it fits a static per-tensor mobile setting: per-layer
smoothing scale s = max|X|^α / max|W|^(1−α) with α chosen from a grid by output error (their
β = 1 − α branch of the search), and the iterative low-rank search L ← SVD_r(W − Q(W − L)) in
float64 keeping the best (activation-weighted) error. Departures: activations are quantized per
tensor with static ranges (SVDQuant: groups of 64 channels with dynamic scales, a GPU-kernel
choice), every conv/linear is quantized as in the QuantFace comparison, and convs get our
k×k → 1×1 branch (the released engine supports linear/1×1 layers only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from toolchain.balance.stats import collect_input_absmax
from toolchain.balance.transform import BalanceConfig, _eligible, _layer_plan, apply_balancing, balance_report, fold_producers, select_by_output_error
from toolchain.methods.balanced import calibrate
from toolchain.quant.registry import MethodContext, QuantMethod, register_method
from toolchain.quant.calibrate import prepare_model, quant_layers, quantizers_off
from toolchain.quant.config import QuantConfig

ALPHA_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))


@dataclass
class SVDQuantParams:
    rank: int = 32
    rank_ratio: float = 0.0  # > 0: rank = this fraction of each layer's smaller dimension (fair on small models)
    iterations: int = 20
    search_alpha: bool = True
    alpha: float = 0.5  # used when search_alpha is False


@register_method
class SVDQuant(QuantMethod):
    name = "svdquant"
    Params = SVDQuantParams
    summary_doc = "searched smoothing + iterative 16-bit SVD low-rank branch (rank 32), no training"

    def apply(self, model, config: QuantConfig, ctx: MethodContext) -> dict[str, Any]:
        from toolchain.lowrank.compensate import attach_branches, merge_all, refine_svd

        p = self.params
        layers_n = prepare_model(model, config)
        layers = dict(quant_layers(model))
        alphas = ALPHA_GRID if p.search_alpha else (p.alpha,)
        producers = fold_producers(model)
        with quantizers_off(model):
            absmax = collect_input_absmax(model, layers, ctx.lq_batches)
            candidates = {name: [_layer_plan(name, layer, absmax[name], *producers.get(name, (None, absmax[name].numel())), "scale", a, ctx.seed)
                                 for a in alphas] for name, layer in _eligible(layers, absmax)}
            plans = select_by_output_error(model, layers, candidates, ctx.lq_batches[:2]) if len(alphas) > 1 else {n: c[0] for n, c in candidates.items()}
            apply_balancing(model, plans)
            # the low-rank search weights errors by the *smoothed* activation ranges
            smoothed = collect_input_absmax(model, layers, ctx.lq_batches[:2]) if p.iterations else {}
        attach_branches(model, p.rank, 0, ctx.seed, rank_ratio=p.rank_ratio)
        refined = refine_svd(model, smoothed, p.iterations) if p.iterations else {}
        n = calibrate(model, ctx)
        merged = merge_all(model)
        return {"quantized_layers": len(layers_n), "balance": balance_report(plans, BalanceConfig(mode="scale")).to_dict(),
                "lowrank": {"rank": p.rank, "rank_ratio": p.rank_ratio, "layers": merged, **refined}, "calibration_batches": n}
