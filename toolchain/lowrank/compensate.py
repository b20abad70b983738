"""Attaching, refining, training and merging low-rank branches on a quantized model."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolchain.lowrank.branch import LowRankBranch, Pair, merge_branch, peft_pair, svd_pair
from toolchain.quant.calibrate import calibrate_weights, quant_layers, quantizers_off
from toolchain.quant.quantizer import fake_quantize, qparams_from_range


def layer_rank(layer: nn.Module, rank: int, rank_ratio: float) -> int:
    """``rank``, or — with ``rank_ratio`` > 0 — that fraction of the layer's smaller dimension (≥ 1).

    A fixed rank means very different things on SD-2.1 (320–5120 channels) and on a small model
    (32–512): rank 32 is ~1–3 % of an SD layer but half of a 64-channel one. Ratios keep
    comparisons across model sizes fair.
    """
    if rank <= 0:
        return 0
    if rank_ratio <= 0:
        return rank
    w = layer.weight
    return max(1, round(min(w.shape[0], w[0].numel()) * rank_ratio))


def attach_branches(model: nn.Module, svd_rank: int, lora_rank: int, seed: int = 0, lora_into_residual: bool = False,
                    weight_dtype: torch.dtype = torch.float16, rank_ratio: float = 0.0) -> int:
    """Give every quantized layer a tied SVD part (rank ``svd_rank``) and/or a LoRA part; returns layers touched."""
    n = 0
    for name, layer in quant_layers(model):
        r_svd, r_lora = layer_rank(layer, svd_rank, rank_ratio), layer_rank(layer, lora_rank, rank_ratio)
        if layer.weight_quantizer is None or (r_svd <= 0 and r_lora <= 0):
            continue
        parts: dict[str, Pair] = {}
        if r_svd > 0:
            parts["svd"] = svd_pair(layer, layer.weight, r_svd, weight_dtype)
        if r_lora > 0:
            down, up = peft_pair(layer, r_lora, seed=(seed * 7919 + zlib.crc32(name.encode())) % (2**31))
            parts["lora"] = Pair(down, up, weight_dtype)
        layer.lowrank = LowRankBranch(parts, tied=True, lora_into_residual=lora_into_residual)
        n += 1
    return n


@torch.no_grad()
def refine_svd(model: nn.Module, absmax: dict[str, torch.Tensor], iterations: int, weight_dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """SVDQuant's low-rank search: L ← SVD_r(W − Q(W − L)), keeping the L with the lowest
    activation-weighted weight error ‖(W − L − Q(W − L))·diag(max|X|)‖², stopping when it stops improving."""
    improved = 0
    for name, layer in quant_layers(model):
        branch = layer.lowrank
        if branch is None or "svd" not in branch.parts or layer.weight_quantizer is None or name not in absmax:
            continue
        spec = layer.weight_quantizer.spec
        w = layer.weight.detach().double()
        m = absmax[name].double().to(w.device).reshape(1, -1, *([1] * (w.dim() - 2)))

        def quant(t: torch.Tensor) -> torch.Tensor:
            v = t.flatten(1)
            s, z = qparams_from_range(v.min(1).values, v.max(1).values, spec)
            shape = (-1,) + (1,) * (t.dim() - 1)
            return fake_quantize(t, s.reshape(shape), z.reshape(shape), spec.qmin, spec.qmax)

        def error(lr: torch.Tensor) -> float:
            r = w - lr
            return float(((r - quant(r)) * m).pow(2).sum())

        best = branch.parts["svd"]
        rank = best.rank
        best_lr = best.dense().double()
        best_err = error(best_lr)
        lr = best_lr
        for _ in range(iterations):
            cand = svd_pair(layer, (w - quant(w - lr)).to(layer.weight.dtype), rank, weight_dtype)
            lr = cand.dense().double()
            err = error(lr)
            if err >= best_err:
                break
            best, best_err = cand, err
            improved += 1
        branch.parts["svd"] = best
    return {"svd_refinement_steps": improved}


def _branch_params(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {}
    for name, layer in quant_layers(model):
        if layer.lowrank is not None:
            for pname, p in layer.lowrank.named_parameters():
                params[f"{name}.lowrank.{pname}"] = p
    return params


def follow_trained_weights(model: nn.Module) -> int:
    """Put the weight quantizer of every layer with a low-rank branch in dynamic min-max mode, so its grid
    follows the residual W − L1·L2 (+ B·A) while the branch trains; ``calibrate_weights`` freezes it again.
    Returns the number of layers switched."""
    n = 0
    for _, layer in quant_layers(model):
        if layer.lowrank is not None and layer.weight_quantizer is not None:
            layer.weight_quantizer.dynamic = True
            n += 1
    return n


def train_branches(model: nn.Module, batches: list[torch.Tensor], workdir: Path | None, steps: int, lr: float, seed: int,
                   device: torch.device, lpips_weights: str | None = None, w_perceptual: float = 0.5, w_mse: float = 0.5,
                   gradient_checkpointing: bool = False, checkpoint_every: int = 50, train_parts: tuple[str, ...] = ("svd", "lora"),
                   desc: str = "QD-LoRA") -> dict[str, Any]:
    """Distil the quantized model towards the full-precision one by training only the branches.

    Targets are the float model's restored images (the same network with every quantizer off,
    before any branch training, when the LoRA part is still zero); the weight quantizers follow
    the residual W − L1·L2 as it changes (dynamic min-max), activation ranges stay as calibrated.

    Under torchrun (``toolchain.distributed``) every rank holds the whole model, takes its rows of
    each calibration batch and the branch gradients are summed over ranks; the model's parameters
    and buffers (weights, branches, quantizer ranges) are first made rank 0's on every rank.
    """
    from toolchain.lowrank.losses import distillation_loss
    from toolchain.train.fit import fit

    from toolchain import distributed as D

    D.broadcast_module(model)
    teachers = fp_targets(model, batches, device)
    for p in model.parameters():
        p.requires_grad_(False)
    params = {k: p for k, p in _branch_params(model).items() if any(f".parts.{part}." in k for part in train_parts)}
    if not params:
        return {"trained_parameters": 0}
    follow_trained_weights(model)
    if gradient_checkpointing:
        for part in (model.unet, model.vae):
            part.enable_gradient_checkpointing()
    loss = distillation_loss(lpips_weights, w_perceptual, w_mse)
    try:
        result = fit(params, lambda step, b: loss(model(b[0].to(device)), b[1].to(device)), len(batches), steps, lr, seed,
                     device, workdir, desc, checkpoint_every=checkpoint_every, title=f"{desc} distillation loss ({loss.label})",
                     batches=lambda i: (batches[i], teachers[i]), graphable=True)
    finally:
        if gradient_checkpointing:
            for part in (model.unet, model.vae):
                part.disable_gradient_checkpointing()
    calibrate_weights(model)  # freeze the weight scales on the final residuals (also ends dynamic mode)
    return {**result, "loss": loss.label}


def fp_targets(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The float model's restored images (every quantizer off), kept on the CPU."""
    with torch.no_grad(), quantizers_off(model):
        return [model(b.to(device)).detach().cpu() for b in batches]


def merge_all(model: nn.Module) -> int:
    """Fold every layer's low-rank branch into its weight (W ← W + L1·L2, branch removed), then recalibrate the
    weight grids of the merged weights. Returns the number of layers merged. Used by QuantFace and EfficientDM."""
    n = 0
    for _, layer in quant_layers(model):
        if layer.lowrank is not None:
            merge_branch(layer)
            n += 1
    calibrate_weights(model)
    return n
