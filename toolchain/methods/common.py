"""Pieces the trained baselines share: the 8-bit first/last layers rule and FP stage targets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from toolchain.quant.calibrate import quantizers_off
from toolchain.quant.config import LayerRule, QuantConfig
from toolchain.topology import DEFAULT_KIND, topology

# PassionSR/EfficientDM keep the network's first and last layers at 8 bits. In a one-step model
# the UNet's time-embedding MLP is constant (excluded from quantization altogether), so the rule
# covers the UNet's output conv and the VAE's latent-side and image-side convs: each model kind's
# list is ``toolchain.topology.Topology.first_last``.
FIRST_LAST_LAYERS = topology(DEFAULT_KIND).first_last


def frozen_copy(model: nn.Module) -> nn.Module:
    """An untouched float copy of the model (targets for block/module-wise methods), gradients off."""
    import copy

    fp_model = copy.deepcopy(model).eval()
    for prm in fp_model.parameters():
        prm.requires_grad_(False)
    return fp_model


def keep_first_last_8bit(config: QuantConfig, patterns: tuple[str, ...] = FIRST_LAST_LAYERS) -> list[str]:
    """Prepend W8A8 rules for the first/last layers (user rules still override); returns the patterns."""
    config.rules = [LayerRule(p, 8, 8) for p in patterns] + list(config.rules)
    return list(patterns)


@dataclass
class StageData:
    """FP inputs and FP outputs of one pipeline stage for every calibration batch (CPU tensors)."""

    inputs: list[tuple[torch.Tensor, ...]]
    targets: list[torch.Tensor]
    run: Callable[..., torch.Tensor]  # the model's stage function applied to one input tuple


def stage_data(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> dict[str, StageData]:
    """Cache each stage's FP input and output, so every stage calibrates against the float model
    given float inputs (the stages are then independent of each other's quantization error)."""
    enc_in, enc_out, unet_in, unet_out, dec_in, dec_out = [], [], [], [], [], []
    with torch.no_grad(), quantizers_off(model):
        for b in batches:
            b = b.to(device)
            z = model.encode(b)
            c = model.prompt(b)
            x0 = model.denoise(z, c)
            out = model.decode(x0)
            enc_in.append((b.cpu(),))
            enc_out.append(z.cpu())
            unet_in.append((z.cpu(), c.cpu()))
            unet_out.append(x0.cpu())
            dec_in.append((x0.cpu(),))
            dec_out.append(out.cpu())
    return {"unet": StageData(unet_in, unet_out, model.denoise), "vae_encoder": StageData(enc_in, enc_out, model.encode),
            "vae_decoder": StageData(dec_in, dec_out, model.decode)}
