"""Which part of the pipeline to export: the whole one-step restorer or one stage of it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.errors import ExportError
from toolchain.topology import DEFAULT_KIND, topology, topology_of

PARTS = topology(DEFAULT_KIND).export_parts


class _Part(nn.Module):
    def __init__(self, model: nn.Module, part: str):
        super().__init__()
        self.model = model
        self.part = part

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.part == "full":
            return m(inputs[0])
        if self.part == "vae_encoder":
            return m.encode(inputs[0])
        if self.part == "vae_decoder":
            return m.decode(inputs[0]).clamp(-1.0, 1.0)
        if self.part == "embedder":
            return m.prompt(inputs[0])
        if len(inputs) == 1:  # a constant-prompt model (osediff): the prompt is the model's own buffer
            return m.denoise(inputs[0], m.prompt(inputs[0]))
        return m.denoise(inputs[0], inputs[1])  # unet: (z_L, prompt) → one-step x0 estimate


def spatial_multiple(config, part: str) -> int:
    """The multiple that the height and width of ``part``'s spatial input must be, for a dynamic-shape export.

    The UNet concatenates skip connections with upsampled features, which only line up when the latent
    divides by 2 per UNet downsampling stage; the image parts add the VAE's factor. ``config`` is a
    ModelConfig; returns pixels (image inputs) or latent cells (``unet``, ``vae_decoder``)."""
    unet = 2 ** (len(config.unet["block_out_channels"]) - 1)
    return {"full": config.vae_factor * unet, "vae_encoder": config.vae_factor, "embedder": 1, "unet": unet, "vae_decoder": 1}[part]


PADDED_PARTS = ("full", "unet")  # image → image and latent → latent: the output can be cropped back exactly


class PadToMultiple(nn.Module):
    """Replicate-pad the first input's height and width (bottom/right) up to ``multiple``, run ``inner``,
    crop its output back to the input's size. Inside a dynamic-shape graph this makes every size valid;
    at a multiple the padding is empty and the output is unchanged."""

    def __init__(self, inner: nn.Module, multiple: int):
        super().__init__()
        self.inner = inner
        self.multiple = multiple

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        m = self.multiple
        xp = F.pad(x, (0, (m - w % m) % m, 0, (m - h % m) % m), mode="replicate")
        return self.inner(xp, *rest)[..., :h, :w]


def pad_for_dynamic(module: nn.Module, config, part: str) -> tuple[nn.Module, bool]:
    """(module, padded): wrap ``part`` in PadToMultiple when its output can be cropped back (PADDED_PARTS)."""
    m = spatial_multiple(config, part)
    if part in PADDED_PARTS and m > 1:
        return PadToMultiple(module, m).eval(), True
    return module, False


def part_module(model: nn.Module, part: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str], list[str]]:
    """(module, example inputs, input names, output names) for ``part``."""
    parts = topology_of(model).export_parts
    if part not in parts:
        raise ExportError(f"unknown part '{part}' (choose from {', '.join(parts)})")
    cfg = model.config
    s, ls = cfg.image_size, cfg.latent_size
    image = torch.zeros(1, 3, s, s).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    latent = torch.randn(1, model.unet.config.in_channels, ls, ls, generator=torch.Generator().manual_seed(1))
    prompt = torch.randn(1, *cfg.prompt_shape, generator=torch.Generator().manual_seed(2))
    table = {
        "full": ((image,), ["lq_image"], ["restored_image"]),
        "vae_encoder": ((image,), ["lq_image"], ["latent"]),
        "vae_decoder": ((latent,), ["latent"], ["image"]),
        "embedder": ((image,), ["lq_image"], ["prompt"]),
        "unet": ((latent, prompt), ["latent", "prompt"], ["x0_latent"]),
    }
    if topology_of(model).constant_prompt_modules:  # the prompt is a constant of the model, not an input
        table["unet"] = ((latent,), ["latent"], ["x0_latent"])
    inputs, in_names, out_names = table[part]
    return _Part(model, part).eval(), inputs, in_names, out_names


def part_inputs(model: nn.Module, part: str, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """The inputs ``part`` sees when the whole model restores ``images`` (LQ batches in [-1, 1])."""
    parts = topology_of(model).export_parts
    if part not in parts:
        raise ExportError(f"unknown part '{part}' (choose from {', '.join(parts)})")
    if part in ("full", "vae_encoder", "embedder"):
        return [(b,) for b in images]
    with torch.no_grad():
        if part == "vae_decoder":
            return [(model.denoise(model.encode(b), model.prompt(b)),) for b in images]
        if topology_of(model).constant_prompt_modules:
            return [(model.encode(b),) for b in images]
        return [(model.encode(b), model.prompt(b)) for b in images]
