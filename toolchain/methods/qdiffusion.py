"""Q-Diffusion baseline (one-step form): BRECQ block reconstruction with AdaRound weights.

With a single timestep, Q-Diffusion's timestep-aware calibration collapses to one calibration set
at t = 399. What remains is its reconstruction: for every block, in forward order, learn the
rounding direction of each weight (AdaRound) so the quantized block reproduces the float
block's output on the calibration data,

    min_V  Σ‖block_q(x) − block_fp(x)‖² + λ·Σ(1 − |2h(V) − 1|^β),   β annealed 20 → 2,

with the weight step sizes fixed at their calibrated values and activation scales from
calibration. Block inputs come from the partly quantized model (BRECQ's default) and targets from
a float copy. The concatenated skip inputs of the UNet's up-block shortcut convs get split
quantizers: one range for the upsampled path, one for the skip (stored as a grouped per-channel
activation quantizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from toolchain.methods.common import frozen_copy
from toolchain.quant.registry import MethodContext, QuantMethod, register_method
from toolchain.quant.calibrate import calibrate_activations, calibrate_weights, prepare_model, quant_layers
from toolchain.quant.config import QuantConfig
from toolchain.quant.learnable import AdaRoundQuantizer, group_activation_ranges
from toolchain.quant.quantizer import FakeQuantizer
from toolchain.quant.units import (capture_inputs, capture_outputs, output_error, reconstruction_units, split_samples, tensors_of, to_cpu,
                                   to_device)
from toolchain.train.fit import fit


def shortcut_splits(model: nn.Module) -> dict[str, int]:
    """UNet up-block resnet shortcut convs → channels of the upsampled path (the rest is the skip)."""
    unet = getattr(model, "unet", None)
    if unet is None:
        return {}
    splits: dict[str, int] = {}
    channels = unet.mid_block.resnets[-1].conv2.out_channels if unet.mid_block is not None else None
    for b, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            if channels is not None and getattr(resnet, "conv_shortcut", None) is not None:
                splits[f"unet.up_blocks.{b}.resnets.{j}.conv_shortcut"] = channels
            channels = resnet.conv2.out_channels
    return splits


@dataclass
class QDiffusionParams:
    steps_per_block: int = 200  # Q-Diffusion: ~20k iterations per block on GPU
    lr: float = 1e-3  # AdaRound's Adam learning rate for V
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of steps before the rounding regulariser starts
    split_shortcut: bool = True
    quantized_inputs: bool = True  # block inputs from the partly quantized model (BRECQ), else from the float model
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if self.steps_per_block < 0 or not 0 <= self.warmup < 1:
            raise ValueError("steps_per_block must be >= 0 and warmup in [0, 1)")


@register_method
class QDiffusion(QuantMethod):
    name = "qdiffusion"
    Params = QDiffusionParams
    summary_doc = "block-wise reconstruction with AdaRound weights (BRECQ), calibrated activations, split skip quantizers"

    def apply(self, model, config: QuantConfig, ctx: MethodContext) -> dict[str, Any]:
        p = self.params
        fp_model = frozen_copy(model)
        names = prepare_model(model, config)
        layers = dict(quant_layers(model))
        splits = {k: v for k, v in shortcut_splits(model).items() if k in layers and layers[k].input_quantizer is not None} if p.split_shortcut else {}
        for k in splits:  # per-channel observation, grouped into two ranges after calibration
            spec = layers[k].input_quantizer.spec
            grouped = type(spec)(spec.bits, spec.symmetric, True, "minmax", spec.percentile)
            layers[k].input_quantizer = FakeQuantizer(grouped, channels=layers[k].in_channels, axis=1).to(layers[k].weight.device)
        calibrate_weights(model)
        observed = {k: layers[k].input_quantizer for k in splits}
        for q in observed.values():
            q.mode = "off"  # observed on their own pass below, per channel
        calibrate_activations(model, ctx.lq_batches, state_dir=ctx.state_dir("calib"), names=set(layers) - set(splits))
        for q in observed.values():
            q.start_observing()
        with torch.no_grad():
            for b in ctx.lq_batches:
                model(b.to(ctx.device))
        for k, q in observed.items():
            group_activation_ranges(q, splits[k])

        summary: dict[str, Any] = {"quantized_layers": len(names), "split_quantizers": sorted(splits), "blocks": {}}
        for prm in model.parameters():
            prm.requires_grad_(False)
        for u, unit in enumerate(reconstruction_units(model)):
            summary["blocks"][unit.name] = self._reconstruct(model, fp_model, unit, layers, ctx, u)
        return summary

    def _reconstruct(self, model, fp_model, unit, layers, ctx: MethodContext, index: int) -> dict[str, Any]:
        p = self.params
        targets = []
        with torch.no_grad(), capture_inputs(model if p.quantized_inputs else fp_model, unit.name) as calls:
            for b in ctx.lq_batches:
                with capture_outputs(fp_model, [unit.name]) as seen:
                    fp_model(b.to(ctx.device))
                targets.append(to_cpu(seen[unit.name]))
                if p.quantized_inputs:
                    model(b.to(ctx.device))
        block = model.get_submodule(unit.name)

        def block_error() -> float:
            with torch.no_grad():
                return sum(float(output_error(block(*to_device(a, ctx.device), **to_device(kw, ctx.device)), t))
                           for (a, kw), t in zip(calls, targets)) / max(1, len(calls))

        nearest_error = block_error()
        rounding = {k: AdaRoundQuantizer(layers[k].weight_quantizer, layers[k].weight) for k in unit.layers if layers[k].weight_quantizer is not None}
        saved = {k: layers[k].weight_quantizer for k in rounding}
        for k, ada in rounding.items():
            layers[k].weight_quantizer = ada
        total = max(1, p.steps_per_block)
        warm = int(p.warmup * total)

        # a batch: (its index, the per-sample tensors of the block's recorded call, the block's FP output
        # tensors); under torchrun each rank takes its rows of them. What is not laid out by sample stays in
        # the call's rebuild function, whole on every rank.
        outputs = [tensors_of(t) for t in targets]
        split = [split_samples(call, int(out[0].shape[0])) for call, out in zip(calls, outputs)]

        def batch_of(i: int) -> tuple[Any, ...]:
            return (i, *split[i][0], *outputs[i])

        def loss_fn(step: int, batch: tuple[Any, ...]) -> tuple[torch.Tensor, dict[str, float]]:
            i, rows = batch[0], batch[1:]
            k = len(split[i][0])
            args, kwargs = split[i][1](rows[:k])
            # a mean over the samples; the rounding regulariser below depends on V alone, so the ranks'
            # sample-weighted losses still add up to the 1-process loss and gradient
            rec = output_error(block(*to_device(args, ctx.device), **to_device(kwargs, ctx.device)), list(rows[k:]))
            if step < warm:
                return rec, {"rec": float(rec.detach())}
            beta = p.beta_end + (p.beta_start - p.beta_end) * (1 - (step - warm) / max(1, total - warm))
            reg = sum(ada.regularizer(beta) for ada in rounding.values())
            return rec + p.reg_weight * reg, {"rec": float(rec.detach())}

        params = {f"{k}.v": ada.v for k, ada in rounding.items()}
        result = fit(params, loss_fn, len(calls), p.steps_per_block if rounding else 0, p.lr, ctx.seed + index, ctx.device,
                     ctx.state_dir(f"block{index:03d}"), f"Q-Diffusion {unit.name}", checkpoint_every=p.checkpoint_every,
                     batches=batch_of)
        flipped = 0
        with torch.no_grad():
            for k, ada in rounding.items():
                hard = ada(hard=True)
                nearest = ada.step * torch.clamp(torch.round(layers[k].weight / ada.step), ada.spec.qmin, ada.spec.qmax)
                flipped += int((hard != nearest).sum())
                layers[k].weight.copy_(hard)  # on the grid: re-quantizing with the kept scale is exact
                layers[k].weight_quantizer = saved[k]
        result.pop("history", None)
        return {**result, "layers": len(rounding), "weights_rounded_differently_from_nearest": flipped,
                "block_error_nearest": nearest_error, "block_error_adaround": block_error()}
