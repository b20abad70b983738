"""PassionSR baseline: learnable equivalent transformation (LET), learnable boundary quantizer
(LBQ) and distributed quantization calibration (DQC), stage by stage against the float model.

Per quantized layer, LET rewrites y = W·x + b as W'·x' + b' with

    x' = (x − δ)/s,   W' = W·diag(s),   b' = b + W·δ,

s initialised to (max|X_c|/max|W_c|)^0.3 and δ to zero; both train. While they train, the weight
and bias are torch parametrizations of the frozen originals, so the layer's own forward (and its
quantizers) see the transformed tensors; afterwards the parametrizations are baked into the
weights and the input side becomes an :class:`OnlineBalance` (multiplier 1/s, offset δ) that the
exporters already handle. LBQ then trains each activation quantizer's clipping bounds.

DQC: for each stage (UNet, VAE encoder, VAE decoder) LET trains for ``epochs`` epochs and then
LBQ for ``epochs`` epochs on the stage's MSE against the float stage given float inputs, Adam,
lr ×0.2 after the first epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from toolchain.balance.stats import channel_axis, collect_input_absmax, weight_input_absmax
from toolchain.balance.transform import OnlineBalance
from toolchain.methods.common import keep_first_last_8bit, stage_data
from toolchain.quant.grid import along_axis
from toolchain.quant.registry import MethodContext, QuantMethod, register_method
from toolchain.quant.calibrate import calibrate_activations, calibrate_weights, prepare_model, quant_layers, quantizers_off
from toolchain.quant.config import QuantConfig
from toolchain.quant.learnable import BoundQuantizer
from toolchain.quant.units import split_samples, to_device
from toolchain.topology import STAGE_NAMES, topology_of
from toolchain.train.fit import fit


class LETParams(nn.Module):
    """The learnable scale (log-parametrised, stays positive) and offset of one layer."""

    def __init__(self, scale: torch.Tensor, shift: bool):
        super().__init__()
        self.log_scale = nn.Parameter(scale.log())
        self.shift = nn.Parameter(torch.zeros_like(scale)) if shift else None

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()


class _LETInput(nn.Module):
    def __init__(self, let: LETParams, axis: int):
        super().__init__()
        self.let = let
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis % x.dim()
        if self.let.shift is not None:
            x = x - along_axis(self.let.shift, x.dim(), axis)
        return x / along_axis(self.let.scale, x.dim(), axis)


class _LETWeight(nn.Module):
    def __init__(self, let: LETParams):
        super().__init__()
        self.let = let

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * along_axis(self.let.scale, w.dim(), 1)


class _LETBias(nn.Module):
    """b' = b + W·δ, with W the layer's *original* weight (read through a getter, not a submodule)."""

    def __init__(self, let: LETParams, original_weight):
        super().__init__()
        self.let = let
        self._weight = original_weight

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        w = self._weight()
        return b + F.linear(self.let.shift, w.flatten(1))


def shift_allowed(layer: nn.Module) -> bool:
    """The offset folds exactly into the bias only without spatial padding (linear, 1×1 conv)."""
    if layer.bias is None:
        return False
    if isinstance(layer, nn.Conv2d):
        return tuple(layer.kernel_size) == (1, 1) and tuple(layer.padding) == (0, 0) and layer.groups == 1
    return True


def install_let(layer: nn.Module, x_absmax: torch.Tensor, exponent: float) -> LETParams:
    w_absmax = weight_input_absmax(layer.weight).to(x_absmax)
    scale = (x_absmax.clamp(min=1e-5) / w_absmax.clamp(min=1e-5)).pow(exponent).float().to(layer.weight.device)
    let = LETParams(scale, shift_allowed(layer))
    layer.input_transform = _LETInput(let, channel_axis(layer))
    parametrize.register_parametrization(layer, "weight", _LETWeight(let))
    if let.shift is not None:
        parametrize.register_parametrization(layer, "bias", _LETBias(let, lambda: layer.parametrizations.weight.original))
    return let


@torch.no_grad()
def bake_let(layer: nn.Module) -> None:
    """Fold the trained transformation: weights/bias take their transformed values, the input side
    becomes an OnlineBalance (x − δ)·(1/s)."""
    let: LETParams = layer.input_transform.let
    if parametrize.is_parametrized(layer, "bias"):
        parametrize.remove_parametrizations(layer, "bias", leave_parametrized=True)
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    online = OnlineBalance(let.log_scale.numel(), channel_axis(layer), rotate=False, shift=let.shift is not None)
    online.multiplier.copy_(1.0 / let.scale)
    if let.shift is not None:
        online.shift.copy_(let.shift)
    layer.input_transform = online.to(layer.weight.device)


@dataclass
class PassionSRParams:
    let_exponent: float = 0.3
    epochs: int = 2  # per phase (LET, then LBQ) and stage
    lr: float = 1e-5
    stages: tuple[str, ...] = ("unet", "vae_encoder", "vae_decoder")
    first_last_8bit: bool = True
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        self.stages = tuple(self.stages)
        unknown = set(self.stages) - set(STAGE_NAMES)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {list(STAGE_NAMES)}")
        if self.epochs < 0:
            raise ValueError("epochs must be >= 0")


def _stage_layers(model: nn.Module, stage: str) -> list[str]:
    prefixes = topology_of(model).stages[stage]
    return [n for n, _ in quant_layers(model) if any(n == p or n.startswith(p + ".") for p in prefixes)]


@register_method
class PassionSR(QuantMethod):
    name = "passionsr"
    Params = PassionSRParams
    summary_doc = "learnable equivalent transformation + learnable clipping bounds, calibrated stage by stage (UNet, VAE enc, dec)"

    def apply(self, model, config: QuantConfig, ctx: MethodContext) -> dict[str, Any]:
        p = self.params
        pinned = keep_first_last_8bit(config, topology_of(model).first_last) if p.first_last_8bit else []
        names = prepare_model(model, config)
        layers = dict(quant_layers(model))
        data = stage_data(model, ctx.lq_batches, ctx.device)
        with quantizers_off(model):
            absmax = collect_input_absmax(model, layers, ctx.lq_batches)
        lets = {n: install_let(layer, absmax[n], p.let_exponent) for n, layer in layers.items()
                if n in absmax and not (isinstance(layer, nn.Conv2d) and layer.groups != 1)}
        calibrate_weights(model)
        calibrate_activations(model, ctx.lq_batches, state_dir=ctx.state_dir("calib"))
        summary: dict[str, Any] = {"quantized_layers": len(names), "let_layers": len(lets),
                                   "let_offsets": sum(let.shift is not None for let in lets.values()), "first_last_8bit": pinned, "stages": {}}
        n = len(ctx.lq_batches)
        steps = p.epochs * n
        for stage in p.stages:
            sd = data[stage]
            stage_names = _stage_layers(model, stage)
            if not stage_names:
                continue

            # a batch: (its index, the stage inputs' per-sample tensors, the target); anything not laid
            # out by sample stays in the per-batch rebuild function and every rank sees it whole
            split = [split_samples(inputs, int(target.shape[0])) for inputs, target in zip(sd.inputs, sd.targets)]

            def stage_batch(i: int, split=split, sd=sd) -> tuple[Any, ...]:
                return (i, *split[i][0], sd.targets[i])

            def stage_loss(step: int, batch: tuple[Any, ...], split=split, sd=sd) -> tuple[torch.Tensor, dict[str, float]]:
                i, *rows, target = batch
                out = sd.run(*to_device(split[i][1](rows), ctx.device))
                return F.mse_loss(out, target.to(ctx.device)), {}  # a mean over the samples (one size each)

            # phase 1: LET (weights and activations follow the moving transform with min-max ranges). Not
            # sharded: a dynamic activation range is the min-max of the whole batch, so a rank holding part
            # of it would quantize with other ranges and get another gradient; every rank runs whole batches
            let_params = {f"{k}.{pn}": prm for k in stage_names if k in lets for pn, prm in lets[k].named_parameters()}
            for k in stage_names:
                for q in (layers[k].weight_quantizer, layers[k].input_quantizer):
                    if q is not None:
                        q.dynamic = True
            res_let = fit(let_params, lambda step, i: stage_loss(step, stage_batch(i)), n, steps, p.lr, ctx.seed, ctx.device,
                          ctx.state_dir(f"{stage}_let"), f"PassionSR {stage} LET", lr_schedule="step", milestones=(n,),
                          checkpoint_every=p.checkpoint_every)
            for k in stage_names:
                if k in lets:
                    bake_let(layers[k])
                layers[k].calibrate_weight()
                if layers[k].input_quantizer is not None:
                    layers[k].input_quantizer.dynamic = False
            calibrate_activations(model, ctx.lq_batches, state_dir=ctx.state_dir(f"{stage}_calib"), names=set(stage_names))
            # phase 2: LBQ (learnable clipping bounds of the stage's activation quantizers; fixed ranges, so
            # the samples are independent and under torchrun each rank trains on its rows of every batch)
            bounds = {k: BoundQuantizer(layers[k].input_quantizer) for k in stage_names if layers[k].input_quantizer is not None}
            for k, bq in bounds.items():
                layers[k].input_quantizer = bq
            bound_params = {f"{k}.{pn}": prm for k, bq in bounds.items() for pn, prm in bq.named_parameters()}
            res_lbq = fit(bound_params, stage_loss, n, steps, p.lr, ctx.seed, ctx.device, ctx.state_dir(f"{stage}_lbq"),
                          f"PassionSR {stage} LBQ", lr_schedule="step", milestones=(n,), checkpoint_every=p.checkpoint_every,
                          batches=stage_batch)
            for k, bq in bounds.items():
                layers[k].input_quantizer = bq.to_fake_quantizer()
            summary["stages"][stage] = {"layers": len(stage_names), "let": res_let, "lbq": res_lbq}
        untrained = [k for k, layer in layers.items() if parametrize.is_parametrized(layer)]
        for k in untrained:  # stages left out: keep the initial transformation, folded
            bake_let(layers[k])
            layers[k].calibrate_weight()
        if untrained:
            calibrate_activations(model, ctx.lq_batches, names=set(untrained))
        return summary
