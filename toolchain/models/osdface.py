"""The OSDFace-shaped one-step restoration network.

    z_L = VAE.encode(x_L)·scale            (posterior mean; upstream samples with a fixed seed)
    c   = Embedder(x_L)                    (visual prompt, replaces the text encoder)
    ε   = UNet(z_L, t, c)
    z_H = (z_L − √(1−ᾱ_t)·ε) / √ᾱ_t        (one-step x0 estimate)
    x_H = VAE.decode(z_H / scale)

Images are NCHW in [-1, 1]. The stages are separate methods so exporters and the trainer can
address them one at a time.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from toolchain.models.configs import ModelConfig
from toolchain.models.embedder import VisualPromptEmbedder


class OSDFaceModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.unet = UNet2DConditionModel(**config.unet)
        self.vae = AutoencoderKL(**config.vae)
        self.embedder = VisualPromptEmbedder(config.embedder)
        self.register_buffer("timestep", torch.tensor(config.timestep, dtype=torch.long), persistent=False)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.vae.encoder(image)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        mean = moments[:, : self.vae.config.latent_channels]
        return mean * self.config.latent_scaling

    def prompt(self, image: torch.Tensor) -> torch.Tensor:
        return self.embedder(image)

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
        """LQ image in [-1, 1] → restored image in [-1, 1]."""
        z = self.encode(image)
        x0 = self.denoise(z, self.prompt(image))
        return self.decode(x0).clamp(-1.0, 1.0)


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The network class of ``config.kind`` (OSDFaceModel or OSEDiffModel)."""
    if config.kind == "osediff":
        from toolchain.models.osediff import OSEDiffModel

        return OSEDiffModel
    return OSDFaceModel


def build_model(config: ModelConfig, seed: int | None = 0) -> OSDFaceModel:
    """Build a model of ``config.kind`` with deterministic random init (weights are normally loaded afterwards)."""
    cls = model_class(config)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config).eval()
    return cls(config).eval()
