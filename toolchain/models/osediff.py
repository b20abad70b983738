"""The OSEDiff-kind one-step super-resolution network (the backbone PassionSR and QArtSR quantize).

    x_up = bicubic×upscale(x_L).clamp(−1, 1)       (upstream: PIL bicubic ×4 before the model)
    z_L  = VAE.encode(x_up)·scale                  (posterior mean; upstream samples)
    ε    = UNet(z_L, 999, c)                       (c: a constant prompt embedding, (1, 77, cross))
    z_H  = (z_L − √(1−ᾱ)·ε) / √ᾱ                    (closed form; upstream's scheduler.step fails on new diffusers)
    x_H  = VAE.decode(z_H / scale)

Upstream: cswry/OSEDiff ``osediff.py`` / ``test_osediff.py`` (UPSTREAM.md "Release layouts"). The
prompt is constant because DAPE + CLIP are not available offline (PassionSR feeds a fixed embedding
too). The upscale uses torch's bicubic (a = −0.75), not PIL's (a = −0.5): outputs differ from
upstream's preprocessing by that interpolation. Images are NCHW in [-1, 1]; the output is
``upscale`` times the input size. The stage methods mirror ``OSDFaceModel`` so quantization methods
and exporters address both kinds alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from toolchain.models.configs import ModelConfig


class OSEDiffModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.unet = UNet2DConditionModel(**config.unet)
        self.vae = AutoencoderKL(**config.vae)
        tokens, width = config.prompt_shape
        self.register_buffer("prompt_embeds", torch.zeros(1, tokens, width))
        self.register_buffer("timestep", torch.tensor(config.timestep, dtype=torch.long), persistent=False)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def upscale(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, 3, uH, uW) bicubic, clamped to [-1, 1] (PIL saturates at 0/255 too)."""
        u = self.config.upscale
        if u == 1:
            return image
        return F.interpolate(image, scale_factor=u, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.vae.encoder(self.upscale(image))
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        return moments[:, : self.vae.config.latent_channels] * self.config.latent_scaling

    def prompt(self, image: torch.Tensor) -> torch.Tensor:
        """The constant prompt embedding, (B, 77, cross_attention_dim)."""
        return self.prompt_embeds.expand(image.shape[0], -1, -1)

    def denoise(self, z: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        t = self.timestep.expand(z.shape[0])
        eps = self.unet(z, t, encoder_hidden_states=prompt, return_dict=False)[0]
        return (z - self.config.sqrt_one_minus_alpha_bar * eps) / self.config.sqrt_alpha_bar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.config.latent_scaling
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        return self.vae.decoder(z)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """LR image (B, 3, S, S) in [-1, 1] → SR image (B, 3, uS, uS) in [-1, 1]."""
        z = self.encode(image)
        return self.decode(self.denoise(z, self.prompt(image))).clamp(-1.0, 1.0)
