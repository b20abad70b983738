"""EfficientDM baseline: quantization-aware low-rank fine-tuning.

Every quantized layer gets a LoRA pair A·B (A Gaussian, B zero) *inside* the quantized weight,
Q(W + A·B), and every activation quantizer a learnable step size (LSQ); both train by distilling
the float model's restored image (MSE by default, as EfficientDM distills the FP output). After
training, A·B is merged into W, weight scales are recomputed on the merged weight and the step
sizes are frozen, so the result is a plain fake-quant checkpoint with no branch at run time.
First/last layers stay at 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from toolchain import distributed as D
from toolchain.lowrank.compensate import attach_branches, fp_targets
from toolchain.lowrank.compensate import merge_all
from toolchain.methods.common import keep_first_last_8bit
from toolchain.topology import topology_of
from toolchain.quant.registry import MethodContext, QuantMethod, register_method
from toolchain.quant.calibrate import calibrate_activations, calibrate_weights, prepare_model, quant_layers
from toolchain.quant.config import QuantConfig
from toolchain.quant.learnable import activation_quantizers, freeze_step_sizes
from toolchain.train.fit import fit


@dataclass
class EfficientDMParams:
    lora_rank: int = 32
    rank_ratio: float = 0.0  # > 0: rank = this fraction of each layer's smaller dimension
    train_steps: int = 200
    lr: float = 1e-4
    learn_act_scales: bool = True
    w_perceptual: float = 0.0  # EfficientDM distills with MSE; the perceptual term is optional here
    w_mse: float = 1.0
    lpips_weights: str | None = None
    first_last_8bit: bool = True
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.lora_rank <= 0 or self.train_steps < 0:
            raise ValueError("lora_rank must be > 0 and train_steps >= 0")


def lora_and_scale_params(model) -> dict[str, torch.nn.Parameter]:
    params = {}
    for name, layer in quant_layers(model):
        if layer.lowrank is not None:
            for pname, prm in layer.lowrank.named_parameters():
                params[f"{name}.lowrank.{pname}"] = prm
        if layer.input_quantizer is not None and isinstance(layer.input_quantizer.scale, torch.nn.Parameter):
            params[f"{name}.input_quantizer.scale"] = layer.input_quantizer.scale
    return params


@register_method
class EfficientDM(QuantMethod):
    name = "efficientdm"
    Params = EfficientDMParams
    summary_doc = "LoRA inside the quantized weight + LSQ activation step sizes, distilled from the FP output, merged"

    def apply(self, model, config: QuantConfig, ctx: MethodContext) -> dict[str, Any]:
        from toolchain.lowrank.losses import distillation_loss

        p = self.params
        pinned = keep_first_last_8bit(config, topology_of(model).first_last) if p.first_last_8bit else []
        names = prepare_model(model, config)
        calibrate_weights(model)
        n_cal = calibrate_activations(model, ctx.lq_batches, state_dir=ctx.state_dir("calib"))
        teachers = fp_targets(model, ctx.lq_batches, ctx.device)
        attached = attach_branches(model, 0, p.lora_rank, ctx.seed, lora_into_residual=True, weight_dtype=torch.float32, rank_ratio=p.rank_ratio)
        for _, layer in quant_layers(model):
            if layer.weight_quantizer is not None:
                layer.weight_quantizer.dynamic = True  # Q(W + A·B): min-max scales follow the adapted weight
        if p.learn_act_scales:
            for q in activation_quantizers([layer for _, layer in quant_layers(model)]):
                q.make_learnable()
        for prm in model.parameters():
            prm.requires_grad_(False)
        params = lora_and_scale_params(model)
        loss = distillation_loss(p.lpips_weights, p.w_perceptual, p.w_mse) if p.w_perceptual > 0 else None

        def loss_fn(step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            out, target = model(batch[0].to(ctx.device)), batch[1].to(ctx.device)
            if loss is None:
                return torch.nn.functional.mse_loss(out, target), {}
            return loss(out, target)

        D.broadcast_module(model)  # under torchrun: every rank trains from rank 0's state
        result = fit(params, loss_fn, len(ctx.lq_batches), p.train_steps, p.lr, ctx.seed, ctx.device, ctx.state_dir("efficientdm"),
                     "EfficientDM", checkpoint_every=p.checkpoint_every, batches=lambda i: (ctx.lq_batches[i], teachers[i]))
        merged = merge_all(model)  # W ← W + A·B, branches removed, weight grids recalibrated
        frozen = freeze_step_sizes(model)
        return {"quantized_layers": len(names), "calibration_batches": n_cal, "first_last_8bit": pinned, "lora_layers": attached,
                "merged_layers": merged, "learned_step_sizes": frozen, "training": result}
