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

Inputs above the trained size are processed in overlapping latent tiles (``latent_tile`` = 96 latents,
``latent_overlap`` = 32, as upstream: UPSTREAM.md "Release layouts"), blended with Gaussian weights
(σ = 0.1·tile; UPSTREAM.md records tile and overlap, not the weight shape, so that choice is ours).
The VAE encoder and decoder can be tiled the same way (``vae_encoder_tile`` pixels,
``vae_decoder_tile`` latents; off by default). Ours normalises each tile's GroupNorm on the tile
alone, so a tiled VAE is an approximation of the untiled one (measured in tests/test_osediff_sr.py).
"""

from __future__ import annotations

from typing import Callable

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
        # runtime settings (not saved with the model): latent tiling as upstream, VAE tiling off
        self.latent_tile: int | None = 96
        self.latent_overlap: int = 32
        self.vae_encoder_tile: int | None = None
        self.vae_decoder_tile: int | None = None
        self.vae_tile_overlap: float = 0.25  # fraction of a VAE tile shared with its neighbour

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
        """LR image (B, 3, H, W) in [-1, 1] → scaled latent (B, C, uH/f, uW/f) of its ×u upscale."""
        return self.encode_upscaled(self.upscale(image))

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.vae.encoder(x)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        return moments[:, : self.vae.config.latent_channels] * self.config.latent_scaling

    def encode_upscaled(self, x_up: torch.Tensor) -> torch.Tensor:
        """Already-upscaled image (B, 3, H, W) in [-1, 1] → scaled latent (B, C, H/f, W/f), f = VAE factor.

        Tiled (``vae_encoder_tile`` pixels) when that is set and the image is larger."""
        t = self.vae_encoder_tile
        if t and max(x_up.shape[-2:]) > t:
            f = self.config.vae_factor
            return tiled_apply(self._encode_tile, x_up, t, _overlap(t, self.vae_tile_overlap, f), 1 / f, align=f)
        return self._encode_tile(x_up)

    def prompt(self, image: torch.Tensor) -> torch.Tensor:
        """The constant prompt embedding, (B, 77, cross_attention_dim)."""
        return self.prompt_embeds.expand(image.shape[0], -1, -1)

    def denoise(self, z: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, C, h, w) → one-step x0 latent of the same shape.

        Latents larger than ``latent_tile`` on either side go through the UNet in overlapping tiles
        (``latent_overlap``) whose x0 estimates are blended with Gaussian weights; at or below the tile
        size the UNet sees the whole latent (tiled and untiled are then the same computation)."""
        t = self.latent_tile
        if t and max(z.shape[-2:]) > t:
            return tiled_apply(lambda zt: self._denoise(zt, prompt), z, t, self.latent_overlap, 1.0,
                               align=_unet_factor(self.config))
        return self._denoise(z, prompt)

    def _denoise(self, z: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        t = self.timestep.expand(z.shape[0])
        eps = self.unet(z, t, encoder_hidden_states=prompt, return_dict=False)[0]
        return (z - self.config.sqrt_one_minus_alpha_bar * eps) / self.config.sqrt_alpha_bar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, C, h, w) → image (B, 3, fh, fw), not clamped. Tiled (``vae_decoder_tile``
        latents) when that is set and the latent is larger."""
        t = self.vae_decoder_tile
        if t and max(z.shape[-2:]) > t:
            return tiled_apply(self._decode_tile, z, t, _overlap(t, self.vae_tile_overlap, 1), float(self.config.vae_factor))
        return self._decode_tile(z)

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.config.latent_scaling
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        return self.vae.decoder(z)

    @torch.no_grad()
    def fold_constant_prompt(self) -> int:
        """Replace every module that sees only the constant prompt (the cross-attention ``to_k``/``to_v``,
        per ``toolchain.topology``) by a ``ConstantProjection`` holding its output for ``prompt_embeds``
        ((1, 77, inner) float32). Outputs are unchanged to float rounding; the weights leave the model.
        Returns the number of modules replaced (0 if already folded). In place; not reversible."""
        from toolchain.topology import topology_of

        topo = topology_of(self)
        targets = [(n, m) for n, m in self.named_modules()
                   if topo.is_constant_prompt_module(n) and not isinstance(m, ConstantProjection)]
        for name, module in targets:
            parent, _, leaf = name.rpartition(".")
            value = module(self.prompt_embeds.to(next(module.parameters()).dtype))
            setattr(self.get_submodule(parent), leaf, ConstantProjection(value.detach().clone()))
        return len(targets)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """LR image (B, 3, H, W) in [-1, 1] → SR image (B, 3, uH, uW) in [-1, 1]."""
        return self.forward_upscaled(self.upscale(image))

    def forward_upscaled(self, x_up: torch.Tensor) -> torch.Tensor:
        """An image already upscaled outside the model (B, 3, H, W) in [-1, 1], H and W multiples of the VAE
        factor (upstream: PIL bicubic ×4, see ``toolchain.pipeline.restore``) → SR image (B, 3, H, W) in [-1, 1]."""
        z = self.encode_upscaled(x_up)
        return self.decode(self.denoise(z, self.prompt(x_up))).clamp(-1.0, 1.0)


class ConstantProjection(nn.Module):
    """A projection of the constant prompt, precomputed: ``forward(x)`` returns ``value`` (1, T, D)
    expanded to x's batch, in x's dtype, whatever x holds (x must be the constant prompt)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.register_buffer("value", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.to(x.dtype).expand(x.shape[0], -1, -1)


def _unet_factor(config: ModelConfig) -> int:
    return 2 ** (len(config.unet["block_out_channels"]) - 1)


def _overlap(tile: int, fraction: float, align: int) -> int:
    return max(align, int(round(tile * fraction / align)) * align) if fraction > 0 else 0


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``n`` positions, neighbours sharing at least ``overlap``.

    Stride = tile − overlap; the last tile ends exactly at ``n``. ``n`` ≤ ``tile`` gives one tile at 0.
    Raises ValueError unless 0 ≤ overlap < tile."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in [0, {tile})")
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, tile - overlap))
    return starts + [n - tile]


def gaussian_tile_weights(h: int, w: int, sigma: float = 0.1) -> torch.Tensor:
    """(h, w) float32 separable Gaussian weights, peak at the tile centre, σ = ``sigma``·side (all > 0)."""
    def axis(n: int) -> torch.Tensor:
        x = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) / n
        return torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return (axis(h)[:, None] * axis(w)[None, :]).float()


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, scale: float,
                align: int = 1) -> torch.Tensor:
    """Apply ``fn`` to overlapping spatial tiles of ``x`` (B, C, H, W) and blend the results.

    ``fn`` maps a (B, C, h, w) tile to (B, C', h·scale, w·scale). Tiles are ``tile`` wide (clipped to the
    input) with neighbours overlapping by ``overlap``; outputs are averaged with Gaussian weights
    (``gaussian_tile_weights``), so a single tile covering ``x`` returns ``fn(x)`` exactly. ``tile`` and
    ``overlap`` must be multiples of ``align`` (the network's downsampling factor), else ValueError.
    Returns (B, C', H·scale, W·scale) in ``fn``'s dtype."""
    if tile % align or overlap % align:
        raise ValueError(f"tile {tile} and overlap {overlap} must be multiples of {align}")
    H, W = x.shape[-2:]
    th, tw = min(tile, H), min(tile, W)
    ys, xs = tile_starts(H, th, min(overlap, th - 1)), tile_starts(W, tw, min(overlap, tw - 1))
    if len(ys) == 1 and len(xs) == 1:
        return fn(x)
    out = None
    weight = None
    for y in ys:
        for x0 in xs:
            part = fn(x[..., y : y + th, x0 : x0 + tw])
            ph, pw = part.shape[-2:]
            if out is None:
                out = part.new_zeros(*part.shape[:2], round(H * scale), round(W * scale))
                weight = part.new_zeros(1, 1, *out.shape[-2:])
                wt = gaussian_tile_weights(ph, pw).to(part)
            oy, ox = round(y * scale), round(x0 * scale)
            out[..., oy : oy + ph, ox : ox + pw] += part * wt
            weight[..., oy : oy + ph, ox : ox + pw] += wt
    return out / weight


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Match each channel's mean and standard deviation of ``image`` to ``reference`` (AdaIN colour fix).

    ``image`` (B, C, H, W) and ``reference`` (B, C, H', W') in [0, 1] (upstream applies it to [0, 1] images);
    std = √(unbiased variance + eps) for both. Returns (B, C, H, W), not clamped. Upstream: OSEDiff's
    default colour fix (UPSTREAM.md "Release layouts")."""
    def stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = t.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1, unbiased=True) + eps).sqrt()[..., None, None]

    mi, si = stats(image)
    mr, sr = stats(reference)
    return (image - mi) / si * sr + mr
