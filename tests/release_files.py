"""Writes files in the layouts of the upstream OSDFace release, for tests (no real weights).

* ``lightning_ckpt`` — a PyTorch-Lightning-1.x-style pickle: ``state_dict`` plus epoch/step, optimizer
  state and callback state keyed by a *class reference* (``pytorch_lightning.callbacks.model_checkpoint.
  ModelCheckpoint``), which is exactly what makes ``torch.load(weights_only=True)`` refuse it;
* ``malicious_pickle`` — a pickle whose unpickling would run a shell command (``os.system`` through
  ``__reduce__``) that creates a marker file.

The fake Lightning module exists only while a file is being written (pickle stores classes by
name), so loaders under test cannot import it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import types
from collections import OrderedDict
from pathlib import Path

import torch

LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


@contextlib.contextmanager
def _fake_lightning():
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING_MODULE]
    saved = {n: sys.modules.get(n) for n in names}
    mod = types.ModuleType(LIGHTNING_MODULE)

    class ModelCheckpoint:  # the class whose reference keys Lightning's callback state
        pass

    ModelCheckpoint.__module__ = LIGHTNING_MODULE
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for n in names[:-1]:
        sys.modules[n] = types.ModuleType(n)
    sys.modules[LIGHTNING_MODULE] = mod
    try:
        yield ModelCheckpoint
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


class RunsCommand:
    """Unpickling this calls ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def touch_command(marker: Path) -> str:
    return f"touch '{marker}'"


def lightning_ckpt(path: Path, state_dict: dict[str, torch.Tensor], payload: object | None = None, legacy: bool = False) -> Path:
    """Write ``state_dict`` as a Lightning-1.x-style checkpoint (optionally with ``payload`` in its hparams)."""
    with _fake_lightning() as ModelCheckpoint:
        obj = {
            "epoch": 3,
            "global_step": 12000,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": OrderedDict(state_dict),
            "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.25), "best_model_path": "x.ckpt"}},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-4}]}],
            "lr_schedulers": [],
            "hyper_parameters": {"payload": payload} if payload is not None else {},
        }
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def malicious_pickle(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A torch pickle that is nothing but an ``os.system`` call creating ``marker``."""
    torch.save(RunsCommand(touch_command(marker)), path, _use_new_zipfile_serialization=not legacy)
    return path


# ---------------------------------------------------------------------------------------------
# OSDFace release layout at a small width (upstream's constructor takes ch / z_channels /
# embed_dim / n_embed; the key grammar — 173 VRE tensors — is the release's).
# ---------------------------------------------------------------------------------------------

VRE_MULT = (1, 2, 2, 2, 4, 8)


def _conv_init(g, cout, cin, k):
    return torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5, 0.05 * torch.randn(cout, generator=g)


def release_vre_state(ch: int = 32, z: int = 64, n_e: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fresh dict of the (cached) tensors of ``_release_vre_state``."""
    return dict(_release_vre_state(ch, z, n_e, seed))


@functools.lru_cache(maxsize=2)
def _release_vre_state(ch: int, z: int, n_e: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under every key of the released VRE grammar (prefix ``vqvae_LQ.``), written plainly.

    The codebook is spread around the latents of ``sample_images()[0]`` (same norm offsets in random
    directions), so that image snaps to more than 77 distinct codes, as a trained VRE's would.
    """
    g = torch.Generator().manual_seed(seed)
    s: dict[str, torch.Tensor] = {}

    def conv(name, cout, cin, k):
        s[f"{name}.weight"], s[f"{name}.bias"] = _conv_init(g, cout, cin, k)

    def norm(name, c):
        s[f"{name}.weight"] = 1.0 + 0.1 * torch.randn(c, generator=g)
        s[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)

    def block(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def attn(name, c):
        norm(f"{name}.norm1", c)
        norm(f"{name}.norm2", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    e = "vqvae_LQ.encoder"
    conv(f"{e}.conv_in", ch, 3, 3)
    cin = ch
    for level, mult in enumerate(VRE_MULT):
        for b in range(2):
            block(f"{e}.down.{level}.block.{b}", cin, ch * mult)
            cin = ch * mult
            if level == 5:
                attn(f"{e}.down.{level}.attn.{b}", cin)
        if level < 5:
            conv(f"{e}.down.{level}.downsample.conv", cin, cin, 3)
    block(f"{e}.mid.block_1", cin, cin)
    attn(f"{e}.mid.attn_1", cin)
    block(f"{e}.mid.block_2", cin, cin)
    norm(f"{e}.norm_out", cin)
    conv(f"{e}.conv_out", z, cin, 3)
    conv("vqvae_LQ.quant_conv", z, z, 1)
    s["vqvae_LQ.quantize.embedding.weight"] = torch.zeros(n_e, z)
    with torch.no_grad():
        flat = upstream_vre_latent(s, sample_images()[:1])[0].flatten(1).t()  # (positions, z)
    centre, spread = flat.mean(0), (flat - flat.mean(0)).norm(dim=1).mean()
    dirs = torch.randn(n_e, z, generator=g)
    s["vqvae_LQ.quantize.embedding.weight"] = centre + spread * dirs / dirs.norm(dim=1, keepdim=True)
    return s


def sample_images() -> torch.Tensor:
    """Two different 32×32 images in [-1, 1] on the 8-bit grid (so a PNG holds them exactly): uniform
    noise, and a flat grey with faint noise (few distinct codes)."""
    g = torch.Generator().manual_seed(5)
    image = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    image[1] = 0.3 + 0.02 * image[1].flip(-1)
    image = torch.round((image + 1) / 2 * 255) / 255 * 2 - 1
    return image


# ----- the upstream VRE written plainly (lq_embed/vqvae.py, lq_embed/inference.py), on release keys -----

def upstream_vre_latent(sd: dict[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """quant_conv(encoder(x)) of the released VRE: 512² bilinear resize, double normalisation, F.conv2d on release keys."""
    import torch.nn.functional as F

    p = {k[len("vqvae_LQ."):]: v for k, v in sd.items() if k.startswith("vqvae_LQ.")}

    def norm(h, k):
        return F.group_norm(h, 32, p[f"{k}.weight"], p[f"{k}.bias"], eps=1e-6)

    def conv(h, k, stride=1, padding=None):
        w = p[f"{k}.weight"]
        return F.conv2d(h, w, p[f"{k}.bias"], stride=stride, padding=w.shape[-1] // 2 if padding is None else padding)

    def block(h, k):
        r = conv(F.silu(norm(h, f"{k}.norm1")), f"{k}.conv1")
        r = conv(F.silu(norm(r, f"{k}.norm2")), f"{k}.conv2")
        x = conv(h, f"{k}.nin_shortcut") if f"{k}.nin_shortcut.weight" in p else h
        return x + r

    def attn(h, k):
        hn = norm(h, f"{k}.norm1")
        q, kk, v = conv(hn, f"{k}.q"), conv(hn, f"{k}.k"), conv(hn, f"{k}.v")
        b, c, hh, ww = q.shape
        w_ = torch.softmax(q.reshape(b, c, -1).transpose(1, 2) @ kk.reshape(b, c, -1) * c ** -0.5, dim=2)  # (b, hw, hw)
        out = (v.reshape(b, c, -1) @ w_.transpose(1, 2)).reshape(b, c, hh, ww)
        return h + conv(out, f"{k}.proj_out")

    x = F.interpolate(image, size=(512, 512), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5  # upstream's second normalisation of a [-1, 1] input
    h = conv(x, "encoder.conv_in")
    for level in range(6):
        for b in range(2):
            h = block(h, f"encoder.down.{level}.block.{b}")
            if f"encoder.down.{level}.attn.{b}.q.weight" in p:
                h = attn(h, f"encoder.down.{level}.attn.{b}")
        if level < 5:
            h = conv(F.pad(h, (0, 1, 0, 1)), f"encoder.down.{level}.downsample.conv", stride=2, padding=0)
    h = block(attn(block(h, "encoder.mid.block_1"), "encoder.mid.attn_1"), "encoder.mid.block_2")
    h = conv(F.silu(norm(h, "encoder.norm_out")), "encoder.conv_out")
    return conv(h, "quant_conv")


def _nearest(z_i: torch.Tensor, book: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = z_i.flatten(1).t()
    d = (flat ** 2).sum(1, keepdim=True) + (book ** 2).sum(1) - 2 * flat @ book.t()
    return d.min(dim=1)


def upstream_first_unique_codes(z: torch.Tensor, book: torch.Tensor, n_min: int = 77) -> torch.Tensor:
    """Upstream's selection as a Python loop, one image at a time: positions sorted by distance to their
    nearest code, first ``n_min`` distinct codes kept, zero rows if fewer. (B, D, h, w) → (B, n_min, D)."""
    tokens = torch.zeros(z.shape[0], n_min, book.shape[1])
    for i in range(z.shape[0]):
        dmin, idx = _nearest(z[i], book)
        seen: list[int] = []
        for j in torch.sort(dmin, stable=True).indices.tolist():
            if int(idx[j]) not in seen:
                seen.append(int(idx[j]))
            if len(seen) == n_min:
                break
        tokens[i, : len(seen)] = book[seen]
    return tokens


def unique_code_counts(z: torch.Tensor, book: torch.Tensor) -> list[int]:
    """Distinct nearest codes per image of latents z (B, D, h, w)."""
    return [int(_nearest(z[i], book)[1].unique().numel()) for i in range(z.shape[0])]


def decoy_keys(seed: int = 1) -> dict[str, torch.Tensor]:
    """Keys the release file also carries and upstream's loader drops or ignores."""
    g = torch.Generator().manual_seed(seed)
    return {"vqvae_LQ.decoder.conv_in.weight": torch.randn(8, 4, 3, 3, generator=g),
            "vqvae_LQ.decoder.mid.block_1.norm1.weight": torch.randn(8, generator=g),
            "vqvae_LQ.post_quant_conv.weight": torch.randn(4, 4, 1, 1, generator=g),
            "vqvae_LQ.post_quant_conv.bias": torch.randn(4, generator=g),
            "vqvae_HQ.encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=g),
            "discriminator.main.0.weight": torch.randn(8, 3, 4, 4, generator=g)}


def release_projection(e_dim: int = 64, cross: int = 32, seed: int = 2) -> dict[str, torch.Tensor]:
    """``embedding_change_weights.pth``: TwoLayerConv1x1(e_dim, cross) — conv1 (e_dim/2, e_dim, 1), conv2 (cross, e_dim/2, 1)."""
    g = torch.Generator().manual_seed(seed)
    h = e_dim // 2
    return OrderedDict([("conv1.weight", torch.randn(h, e_dim, 1, generator=g) / e_dim**0.5),
                        ("conv1.bias", 0.1 * torch.randn(h, generator=g)),
                        ("conv2.weight", torch.randn(cross, h, 1, generator=g) / h**0.5),
                        ("conv2.bias", 0.1 * torch.randn(cross, generator=g))])


SMALL_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                  cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True, norm_num_groups=8,
                  flip_sin_to_cos=True, freq_shift=0)
SMALL_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                 block_out_channels=[16, 32], layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
                 scaling_factor=0.18215)


def sd_folder(path: Path, seed: int = 3) -> Path:
    """A small SD-style diffusers folder (unet/, vae/, scheduler/) with the SD-2.1 field names and schedule."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        UNet2DConditionModel(**SMALL_UNET).save_pretrained(path / "unet")
        AutoencoderKL(**SMALL_VAE).save_pretrained(path / "vae")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000).save_pretrained(path / "scheduler")
    return path


LORA_TARGETS = ("conv_in", "down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.proj_in",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
                "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", "up_blocks.1.resnets.0.conv_shortcut",
                "up_blocks.1.resnets.1.conv2")


def release_lora(unet_state: dict[str, torch.Tensor], rank: int = 4, seed: int = 4, targets=LORA_TARGETS) -> dict[str, torch.Tensor]:
    """``pytorch_lora_weights.safetensors``: ``unet.<module>.lora_A/B.weight`` with non-zero B (conv A k×k, B 1×1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in targets:
        w = unet_state[f"{t}.weight"]
        if w.ndim == 4:
            a = torch.randn(rank, *w.shape[1:], generator=g) * 0.05
            b = torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.05
        else:
            a = torch.randn(rank, w.shape[1], generator=g) * 0.05
            b = torch.randn(w.shape[0], rank, generator=g) * 0.05
        out[f"unet.{t}.lora_A.weight"], out[f"unet.{t}.lora_B.weight"] = a, b
    return out


def osdface_release(root: Path) -> dict[str, Path]:
    """Write a complete small release: sd/, associate_2.ckpt (Lightning pickle with decoys),
    embedding_change_weights.pth, pytorch_lora_weights.safetensors. Returns the paths by flag."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    sd = sd_folder(root / "sd")
    vre = lightning_ckpt(root / "associate_2.ckpt", {**release_vre_state(), **decoy_keys()})
    proj = root / "embedding_change_weights.pth"
    torch.save(release_projection(), proj)
    unet_state = UNet2DConditionModel.from_pretrained(str(sd / "unet")).state_dict()
    lora = root / "pytorch_lora_weights.safetensors"
    save_file({k: v.contiguous() for k, v in release_lora(unet_state).items()}, str(lora))
    return {"sd": sd, "vre": vre, "proj": proj, "lora": lora}


# ---------------------------------------------------------------------------------------------
# OSEDiff release layout (osediff.pkl) for the small SD folder.
# ---------------------------------------------------------------------------------------------

OSEDIFF_UNET_TARGETS = {
    "default_encoder": ["conv_in", "down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                        "down_blocks.0.attentions.0.proj_in"],
    "default_decoder": ["up_blocks.1.resnets.0.conv_shortcut", "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", "conv_out"],
    "default_others": ["mid_block.attentions.0.transformer_blocks.0.attn2.to_v", "mid_block.resnets.0.conv2"],
}
OSEDIFF_VAE_TARGETS = ["encoder.conv_in", "encoder.down_blocks.0.resnets.0.conv1", "encoder.mid_block.attentions.0.to_q",
                       "encoder.conv_out", "quant_conv"]


def _peft_lora(state: dict[str, torch.Tensor], module: str, adapter: str, rank: int, g) -> dict[str, torch.Tensor]:
    w = state[f"{module}.weight"]
    if w.ndim == 4:
        a, b = torch.randn(rank, *w.shape[1:], generator=g) * 0.05, torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.05
    else:
        a, b = torch.randn(rank, w.shape[1], generator=g) * 0.05, torch.randn(w.shape[0], rank, generator=g) * 0.05
    return {f"{module}.lora_A.{adapter}.weight": a, f"{module}.lora_B.{adapter}.weight": b}


def osediff_pkl_dict(unet_state: dict[str, torch.Tensor], vae_state: dict[str, torch.Tensor], rank: int = 4, seed: int = 6) -> dict:
    """The dict OSEDiff's ``save_model`` writes, with peft names, non-zero B and a fine-tuned conv_in."""
    g = torch.Generator().manual_seed(seed)
    sd_unet: dict[str, torch.Tensor] = {}
    for adapter, modules in OSEDIFF_UNET_TARGETS.items():
        for m in modules:
            sd_unet.update(_peft_lora(unet_state, m, adapter, rank, g))
    sd_unet["conv_in.base_layer.weight"] = unet_state["conv_in.weight"] + 0.1 * torch.randn(unet_state["conv_in.weight"].shape, generator=g)
    sd_unet["conv_in.base_layer.bias"] = unet_state["conv_in.bias"] + 0.1 * torch.randn(unet_state["conv_in.bias"].shape, generator=g)
    sd_vae: dict[str, torch.Tensor] = {}
    for m in OSEDIFF_VAE_TARGETS:
        sd_vae.update(_peft_lora(vae_state, m, "default_encoder", rank, g))
    return {"vae_lora_encoder_modules": list(OSEDIFF_VAE_TARGETS) + ["encoder.conv_in"],  # upstream's list repeats names
            "unet_lora_encoder_modules": OSEDIFF_UNET_TARGETS["default_encoder"],
            "unet_lora_decoder_modules": OSEDIFF_UNET_TARGETS["default_decoder"],
            "unet_lora_others_modules": OSEDIFF_UNET_TARGETS["default_others"],
            "rank_unet": rank, "rank_vae": rank, "state_dict_unet": sd_unet, "state_dict_vae": sd_vae}


def osediff_release(root: Path) -> dict[str, Path]:
    """Write sd/, osediff.pkl and prompt_embeds.safetensors (1, 77, 32). Returns paths by flag."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file

    sd = root / "sd" if (root / "sd").is_dir() else sd_folder(root / "sd")
    unet_state = UNet2DConditionModel.from_pretrained(str(sd / "unet")).state_dict()
    vae_state = AutoencoderKL.from_pretrained(str(sd / "vae")).state_dict()
    weights = root / "osediff.pkl"
    torch.save(osediff_pkl_dict(unet_state, vae_state), weights)
    prompt = root / "prompt_embeds.safetensors"
    save_file({"prompt_embeds": torch.randn(1, 77, SMALL_UNET["cross_attention_dim"], generator=torch.Generator().manual_seed(7))},
              str(prompt))
    return {"sd": sd, "weights": weights, "prompt_embedding": prompt}
