"""Visual prompt embedder (OSDFace's "visual representation embedder", VRE).

It replaces the text encoder: the LQ image is encoded by a VQ encoder, every latent position
is snapped to its nearest codebook entry, the distinct codes closest to the image are kept
(first ``num_tokens`` unique codes in order of distance), and a two-layer projection turns them
into cross-attention embeddings (B, num_tokens, cross_attention_dim).

Upstream selects the unique codes with a Python loop that does not trace. Here the same set is
computed with tensor ops only: a code's rank in "positions sorted by distance, duplicates
removed" is its *smallest* distance over the positions snapped to it, so ranking codes by that
minimum (top-k) gives the same tokens and exports to ONNX/TFLite (ties aside). Each image of a
batch gets its own selection (upstream's loop is only correct for batch 1).

With ``attention_levels=(last,)``, ``input_size=512`` and ``double_normalize`` this is the released
OSDFace VRE (upstream ``lq_embed/vqvae.py``: MultiHeadEncoder with head_size 1, GroupNorm(32, eps
1e-6), ``(0,1,0,1)``-padded stride-2 downsampling, attention at 16×16 and in the mid block;
``lq_embed/inference.py``: TwoLayerConv1x1). The released weights map onto it key by key
(``toolchain.models.release.vre``).

The code-index path (distances, nearest code, selection) runs in float32 when the embedder runs in
bfloat16: upstream casts code indices to the activation dtype, and bfloat16 rounds index 1023 to
1024; here indices stay int64 and the distances are not computed at 8 mantissa bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Encoder
from torch import nn

from toolchain.models.configs import EmbedderConfig

_NO_CODE = 1e30  # finite "infinity" so exported graphs stay free of inf constants


class VisualPromptEmbedder(nn.Module):
    def __init__(self, cfg: EmbedderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(
            in_channels=cfg.in_channels,
            out_channels=cfg.z_channels,
            down_block_types=tuple("AttnDownEncoderBlock2D" if level in cfg.attention_levels else "DownEncoderBlock2D"
                                   for level in range(len(cfg.block_out_channels))),
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups,
            double_z=False,
        )
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.z_channels)
        nn.init.uniform_(self.codebook.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        # Upstream uses 1×1 Conv1d layers; a Linear over the channel axis is the same map.
        self.proj_in = nn.Linear(cfg.z_channels, cfg.proj_hidden)
        self.proj_out = nn.Linear(cfg.proj_hidden, cfg.cross_attention_dim)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) in [-1, 1] → pre-quantisation latent (B, z_channels, h, w)."""
        size = self.cfg.input_size
        if size is not None and tuple(image.shape[-2:]) != (size, size):
            image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        x = (image - 0.5) / 0.5 if self.cfg.double_normalize else image
        return self.quant_conv(self.encoder(x))

    def nearest_codes(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per latent position: index (int64) of the nearest code and its squared distance. z: (B, D, h, w).

        Distances are computed in float32 unless z is float16/32/64 (never in bfloat16).
        """
        work = z.dtype if z.dtype in (torch.float16, torch.float32, torch.float64) else torch.float32
        flat = z.flatten(2).transpose(1, 2).to(work)  # (B, N, D)
        book = self.codebook.weight.to(work)
        dist = flat.pow(2).sum(-1, keepdim=True) - 2.0 * flat @ book.t() + book.pow(2).sum(-1)
        dmin, idx = dist.min(dim=-1)
        return idx, dmin

    def select_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """The first ``num_tokens`` distinct nearest codes per image, ordered by distance; zero rows if fewer.

        z: (B, D, h, w) → (B, num_tokens, D) codebook rows in the codebook's dtype.
        """
        idx, dmin = self.nearest_codes(z)
        dmin = dmin.float()  # ranking only; 1e30 "no code" overflows float16
        codes = torch.arange(self.cfg.codebook_size, device=z.device)
        hit = idx.unsqueeze(-1) == codes  # (B, N, K)
        code_dist = torch.where(hit, dmin.unsqueeze(-1), torch.full_like(dmin.unsqueeze(-1), _NO_CODE)).amin(dim=1)
        neg_dist, order = torch.topk(-code_dist, k=min(self.cfg.num_tokens, self.cfg.codebook_size), dim=-1)
        valid = (-neg_dist < _NO_CODE * 0.5).to(self.codebook.weight.dtype).unsqueeze(-1)
        tokens = self.codebook.weight[order] * valid
        missing = self.cfg.num_tokens - tokens.shape[1]
        if missing > 0:
            tokens = F.pad(tokens, (0, 0, 0, missing))
        return tokens

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.silu(self.proj_out(F.silu(self.proj_in(tokens))))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.project(self.select_tokens(self.encode(image)))

    def vq_losses(self, image: torch.Tensor, beta: float = 0.25) -> torch.Tensor:
        """Codebook + commitment loss (VQ-VAE) for training the reference model's embedder."""
        z = self.encode(image)
        idx, _ = self.nearest_codes(z)
        flat = z.flatten(2).transpose(1, 2)
        q = self.codebook(idx)
        return F.mse_loss(q, flat.detach()) + beta * F.mse_loss(flat, q.detach())
