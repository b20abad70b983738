"""Architecture configurations of OSDFace-shaped models and the named presets.

A ModelConfig fully determines the module tree, so it is stored beside every saved model and
quantized checkpoint and the network can be rebuilt without any code outside this package.

Kinds: ``osdface`` (UNet + VAE + visual prompt embedder, t = 399) and ``osediff`` (×4 bicubic
upscale, UNet + VAE with a constant prompt embedding, t = 999; no embedder).

Presets:
  * ``osdface`` – SD-2.1-base UNet + VAE and the upstream visual representation embedder (VRE),
    at the sizes of the released OSDFace model (for real checkpoints and GPU benchmarks).
  * ``ref``     – the project's small trained reference model (128×128 faces).
  * ``ref-l``   – a larger reference model (28.6 M, 128×128) with SD-2.1's channel families (80/160/320,
    feed-forward 640), to be trained on the GPU until its validation PSNR stops improving.
  * ``tiny``    – a random network that runs in well under a second on CPU (unit tests).
  * ``osediff`` – OSEDiff at SD-2.1-base sizes (128 px LR → 512 px; what `model import osediff` gives).
  * ``osediff-tiny`` – a random OSEDiff-kind network of the same size (unit tests).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from toolchain.errors import ConfigError


def sd_alpha_bar(t: int, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> float:
    """ᾱ_t of Stable Diffusion's ``scaled_linear`` schedule, in float64 as upstream computes it."""
    import numpy as np

    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    return float(np.cumprod(1.0 - betas)[t])


KINDS = ("osdface", "osediff")


@dataclass
class EmbedderConfig:
    """Visual prompt embedder: VQ encoder → nearest codes → first-T unique codes → projection."""

    in_channels: int = 3
    block_out_channels: tuple[int, ...] = (64, 128, 128, 128, 256, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    z_channels: int = 512
    codebook_size: int = 1024
    num_tokens: int = 77
    proj_hidden: int = 256
    cross_attention_dim: int = 1024
    # Upstream OSDFace normalises its already [-1, 1] input a second time ((x - 0.5) / 0.5);
    # its weights expect that, so the osdface preset reproduces it.
    double_normalize: bool = False
    # Encoder levels whose resnet blocks are each followed by single-head self-attention. The
    # released VRE (a taming-style "MultiHeadEncoder", attention at 16×16) has it at its last level.
    attention_levels: tuple[int, ...] = ()
    # Square size the embedder resizes its input to (bilinear, align_corners=False) before encoding;
    # upstream always runs the VRE at 512×512 whatever the UNet/VAE size. None: no resize.
    input_size: int | None = None

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.attention_levels = tuple(int(level) for level in self.attention_levels)
        bad = [lv for lv in self.attention_levels if not 0 <= lv < len(self.block_out_channels)]
        if bad:
            raise ConfigError(f"embedder attention_levels {bad} outside 0..{len(self.block_out_channels) - 1}")


@dataclass
class ModelConfig:
    """Everything needed to rebuild an OSDFace-shaped model."""

    name: str
    image_size: int  # the model's input size (for osediff the low-resolution input; output is upscale× larger)
    unet: dict[str, Any]
    vae: dict[str, Any]
    embedder: EmbedderConfig | None = field(default_factory=EmbedderConfig)  # None for osediff
    timestep: int = 399
    alpha_bar: float = field(default_factory=lambda: sd_alpha_bar(399))
    latent_scaling: float = 0.18215
    version: int = 1
    kind: str = "osdface"
    upscale: int = 1  # input → VAE resolution factor (osediff: 4, bicubic)

    def __post_init__(self) -> None:
        if isinstance(self.embedder, dict):
            self.embedder = EmbedderConfig(**self.embedder)
        if self.kind not in KINDS:
            raise ConfigError(f"unknown model kind '{self.kind}' (choose from {', '.join(KINDS)})")
        if (self.embedder is None) != (self.kind == "osediff"):
            raise ConfigError(f"a {self.kind} model {'has no' if self.kind == 'osediff' else 'needs an'} embedder")
        if not 0.0 < self.alpha_bar < 1.0:
            raise ConfigError(f"alpha_bar must be in (0, 1), got {self.alpha_bar}")
        factor = 2 ** (len(self.vae["block_out_channels"]) - 1)
        if (self.image_size * self.upscale) % (factor * 2 ** (len(self.unet["block_out_channels"]) - 1)):
            raise ConfigError(f"image_size {self.image_size} is not divisible by the model's total downsampling")

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size * self.upscale // self.vae_factor

    @property
    def prompt_shape(self) -> tuple[int, int]:
        """(tokens, width) of the UNet's encoder_hidden_states for one image."""
        if self.embedder is not None:
            return self.embedder.num_tokens, self.embedder.cross_attention_dim
        return 77, int(self.unet["cross_attention_dim"])

    @property
    def sqrt_alpha_bar(self) -> float:
        return math.sqrt(self.alpha_bar)

    @property
    def sqrt_one_minus_alpha_bar(self) -> float:
        return math.sqrt(1.0 - self.alpha_bar)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["embedder"] is not None:
            d["embedder"]["block_out_channels"] = list(d["embedder"]["block_out_channels"])
            d["embedder"]["attention_levels"] = list(d["embedder"]["attention_levels"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a model config must be a JSON object, not {type(d).__name__ if d is not None else 'null'}")
        d = copy.deepcopy(d)
        version = d.get("version", 1)
        if version != 1:
            raise ConfigError(f"model config version {version} is not supported by this toolchain (expects 1)")
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"invalid model config: {exc}") from None


def _sd21_unet() -> dict[str, Any]:
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=[320, 640, 1280, 1280],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=1024,
        attention_head_dim=[5, 10, 20, 20],
        use_linear_projection=True,
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def _sd_vae(block_out: list[int], layers: int = 2, groups: int = 32, size: int = 512) -> dict[str, Any]:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(block_out),
        up_block_types=["UpDecoderBlock2D"] * len(block_out),
        block_out_channels=list(block_out),
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=size,
        scaling_factor=0.18215,
    )


def _osdface() -> ModelConfig:
    return ModelConfig(
        name="osdface",
        image_size=512,
        unet=_sd21_unet(),
        vae=_sd_vae([128, 256, 512, 512]),
        embedder=EmbedderConfig(double_normalize=True, attention_levels=(5,), input_size=512),
    )


def _ref() -> ModelConfig:
    return ModelConfig(
        name="ref",
        image_size=128,
        unet=dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=[64, 128, 256],
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=256,
            attention_head_dim=[2, 4, 8],
            use_linear_projection=True,
            norm_num_groups=32,
            flip_sin_to_cos=True,
            freq_shift=0,
        ),
        vae=_sd_vae([32, 64, 128], layers=1, groups=16, size=128),
        embedder=EmbedderConfig(
            block_out_channels=(32, 64, 64, 128),
            layers_per_block=1,
            norm_num_groups=16,
            z_channels=128,
            codebook_size=256,
            num_tokens=32,
            proj_hidden=128,
            cross_attention_dim=256,
        ),
    )


def _ref_l() -> ModelConfig:
    """28.6 M parameters at 128 px with SD-2.1's Hadamard channel families.

    UNet widths 80 / 160 / 320 (Paley order 80, 160 = 20⊗8, 320 = 20⊗16 as in SD-2.1's first level),
    feed-forward widths 320 / 640 (GEGLU inner 4×), VAE 64 / 128 / 192 (192 = 12⊗16), cross-attention
    width 320. Same block types as ``ref`` (attention in the first two UNet levels).
    """
    base = _ref()
    unet = dict(base.unet, block_out_channels=[80, 160, 320], attention_head_dim=[1, 2, 4], cross_attention_dim=320,
                norm_num_groups=16)
    return ModelConfig(
        name="ref-l",
        image_size=128,
        unet=unet,
        vae=_sd_vae([64, 128, 192], layers=1, groups=32, size=128),
        embedder=EmbedderConfig(
            block_out_channels=(32, 64, 128, 128),
            layers_per_block=1,
            norm_num_groups=16,
            z_channels=128,
            codebook_size=512,
            num_tokens=32,
            proj_hidden=256,
            cross_attention_dim=320,
        ),
    )


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        image_size=32,
        unet=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=[32, 64],
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=32,
            attention_head_dim=8,
            use_linear_projection=True,
            norm_num_groups=8,
            flip_sin_to_cos=True,
            freq_shift=0,
        ),
        vae=_sd_vae([16, 32], layers=1, groups=8, size=32),
        embedder=EmbedderConfig(
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            z_channels=16,
            codebook_size=32,
            num_tokens=8,
            proj_hidden=16,
            cross_attention_dim=32,
        ),
    )


def _osediff() -> ModelConfig:
    """OSEDiff at SD-2.1-base sizes: 128 px LR in, ×4 → 512 px (64² latents), t = 999, constant prompt."""
    base = _osdface()
    return ModelConfig(name="osediff", image_size=128, unet=base.unet, vae=base.vae, embedder=None, timestep=999,
                       alpha_bar=sd_alpha_bar(999), kind="osediff", upscale=4)


def _osediff_tiny() -> ModelConfig:
    t = _tiny()
    return ModelConfig(name="osediff-tiny", image_size=8, unet=t.unet, vae=t.vae, embedder=None, timestep=999,
                       alpha_bar=sd_alpha_bar(999), kind="osediff", upscale=4)


PRESETS = {"osdface": _osdface, "ref": _ref, "ref-l": _ref_l, "tiny": _tiny, "osediff": _osediff, "osediff-tiny": _osediff_tiny}


def preset(name: str) -> ModelConfig:
    """Return a fresh copy of a named preset config."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown model preset '{name}' (choose from {', '.join(PRESETS)})") from None
