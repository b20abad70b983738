"""The released OSDFace VRE checkpoint: key grammar, expected shapes, and the map onto our embedder.

Upstream (``lq_embed/vqvae.py``, ``lq_embed/inference.py``; see /work/shared/UPSTREAM.md "Release
layouts"): ``associate_2.ckpt["state_dict"]`` holds the VQ encoder under ``vqvae_LQ.encoder.``, the
codebook ``vqvae_LQ.quantize.embedding.weight (n_e, e_dim)`` and ``vqvae_LQ.quant_conv (e_dim, z, 1, 1)``
— 173 tensors, 29,172,416 parameters at the released width — next to keys upstream drops (the VQ
decoder, ``post_quant_conv``, other networks). ``embedding_change_weights.pth`` holds the two-layer
1×1 Conv1d projection ``conv1 (h, e_dim, 1)``, ``conv2 (cross, h, 1)``.

Structure is fixed by the grammar: 6 levels with channel multipliers (1, 2, 2, 2, 4, 8) of a base
width ``ch``, 2 resnet blocks per level, single-head attention after each block of the last level
(16×16 at 512 px) and in the mid block, GroupNorm with 32 groups. Free, as in upstream's constructor
(``vqvae_encoder(ch=…, z_channels=…, embed_dim=…, n_embed=…)``): ``ch`` (a multiple of 32),
``z_channels``, ``embed_dim`` and ``n_embed``; they are read from ``conv_in``, ``conv_out`` and the
codebook, and every other shape must follow from them. Released values: ch 64, z 512, e_dim 512, n_e 1024.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolchain.errors import CheckpointError
from toolchain.models.configs import EmbedderConfig

PREFIX = "vqvae_LQ."
LEVEL_MULT = (1, 2, 2, 2, 4, 8)
BLOCKS = 2
ATTN_LEVEL = len(LEVEL_MULT) - 1
NUM_TOKENS = 77
VRE_INPUT_SIZE = 512
NORM_GROUPS = 32
_ATTN_LINEAR_WEIGHTS = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")


@dataclass(frozen=True)
class VreWidths:
    ch: int
    in_channels: int
    z_channels: int
    embed_dim: int
    n_embed: int


@dataclass(frozen=True)
class _Entry:
    shape: tuple[int, ...]
    ours: str | None  # None: present in the release, unused by its inference (attention norm2)


def _conv(grammar: dict, rel: str, ours: str, cout: int, cin: int, k: int) -> None:
    grammar[f"{rel}.weight"] = _Entry((cout, cin, k, k), f"{ours}.weight")
    grammar[f"{rel}.bias"] = _Entry((cout,), f"{ours}.bias")


def _norm(grammar: dict, rel: str, ours: str | None, c: int) -> None:
    grammar[f"{rel}.weight"] = _Entry((c,), ours and f"{ours}.weight")
    grammar[f"{rel}.bias"] = _Entry((c,), ours and f"{ours}.bias")


def _resnet(grammar: dict, rel: str, ours: str, cin: int, cout: int) -> None:
    _norm(grammar, f"{rel}.norm1", f"{ours}.norm1", cin)
    _conv(grammar, f"{rel}.conv1", f"{ours}.conv1", cout, cin, 3)
    _norm(grammar, f"{rel}.norm2", f"{ours}.norm2", cout)
    _conv(grammar, f"{rel}.conv2", f"{ours}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(grammar, f"{rel}.nin_shortcut", f"{ours}.conv_shortcut", cout, cin, 1)


def _attention(grammar: dict, rel: str, ours: str, c: int) -> None:
    _norm(grammar, f"{rel}.norm1", f"{ours}.group_norm", c)
    _norm(grammar, f"{rel}.norm2", None, c)
    for src, dst in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        _conv(grammar, f"{rel}.{src}", f"{ours}.{dst}", c, c, 1)  # 1×1 conv → Linear (squeezed on load)


def release_grammar(w: VreWidths) -> dict[str, _Entry]:
    """Release key (with the ``vqvae_LQ.`` prefix) → expected shape and our embedder key, for widths ``w``."""
    g: dict[str, _Entry] = {}
    e = "encoder."
    _conv(g, f"{e}conv_in", f"{e}conv_in", w.ch, w.in_channels, 3)
    cin = w.ch
    for level, mult in enumerate(LEVEL_MULT):
        cout = w.ch * mult
        for b in range(BLOCKS):
            _resnet(g, f"{e}down.{level}.block.{b}", f"{e}down_blocks.{level}.resnets.{b}", cin, cout)
            cin = cout
            if level == ATTN_LEVEL:
                _attention(g, f"{e}down.{level}.attn.{b}", f"{e}down_blocks.{level}.attentions.{b}", cout)
        if level != ATTN_LEVEL:
            _conv(g, f"{e}down.{level}.downsample.conv", f"{e}down_blocks.{level}.downsamplers.0.conv", cout, cout, 3)
    _resnet(g, f"{e}mid.block_1", f"{e}mid_block.resnets.0", cin, cin)
    _attention(g, f"{e}mid.attn_1", f"{e}mid_block.attentions.0", cin)
    _resnet(g, f"{e}mid.block_2", f"{e}mid_block.resnets.1", cin, cin)
    _norm(g, f"{e}norm_out", f"{e}conv_norm_out", cin)
    _conv(g, f"{e}conv_out", f"{e}conv_out", w.z_channels, cin, 3)
    _conv(g, "quant_conv", "quant_conv", w.embed_dim, w.z_channels, 1)
    g["quantize.embedding.weight"] = _Entry((w.n_embed, w.embed_dim), "codebook.weight")
    return {PREFIX + k: v for k, v in g.items()}


def _shape(state: dict, key: str, ndim: int, where: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{where} has no {key}: is it the VRE checkpoint (associate_2.ckpt)?")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{where}: {key} has shape {shape}, expected {ndim} dimensions")
    return shape


def read_widths(state: dict[str, torch.Tensor], where: str) -> VreWidths:
    """The free widths of the release grammar, read from ``conv_in``, ``conv_out`` and the codebook."""
    ch, cin, _, _ = _shape(state, PREFIX + "encoder.conv_in.weight", 4, where)
    z = _shape(state, PREFIX + "encoder.conv_out.weight", 4, where)[0]
    n_e, e_dim = _shape(state, PREFIX + "quantize.embedding.weight", 2, where)
    if ch % NORM_GROUPS:
        raise CheckpointError(f"{where}: VRE base width {ch} is not a multiple of the {NORM_GROUPS} GroupNorm groups")
    if z != e_dim:
        raise CheckpointError(f"{where}: VRE z_channels {z} differs from the codebook dimension {e_dim}; only equal widths "
                              "(as released: 512) are supported")
    return VreWidths(ch=ch, in_channels=cin, z_channels=z, embed_dim=e_dim, n_embed=n_e)


@dataclass
class VreImport:
    """Our embedder tensors (keys without ``embedder.``) and what was left out of the release file."""

    tensors: dict[str, torch.Tensor]
    widths: VreWidths
    release_tensors: int                 # grammar tensors found (173)
    release_params: int                  # their parameter count
    unused: list[str]                    # present in the grammar, unused by upstream inference (norm2)
    filtered: dict[str, int]             # category → count of keys upstream's loader also drops or ignores


def _category(key: str) -> str:
    if key.startswith(PREFIX + "decoder."):
        return "vqvae_LQ.decoder"
    if key.startswith(PREFIX + "post_quant_conv."):
        return "vqvae_LQ.post_quant_conv"
    if key.startswith(PREFIX + "quantize.") and not key.endswith("embedding.weight"):
        return "vqvae_LQ.quantize buffers"
    if not key.startswith(PREFIX):
        return "outside vqvae_LQ"
    return ""


def import_vre(state: dict[str, torch.Tensor], where: str) -> VreImport:
    """Check a released VRE state dict strictly against the grammar and map it onto our embedder.

    Every grammar tensor must be present with its expected shape (upstream loads with strict=False,
    leaving missing tensors random); keys of the VQ decoder, ``post_quant_conv``, quantizer buffers and
    other networks are dropped and counted; any other ``vqvae_LQ.`` key is an error. 1×1 attention convs
    become Linear weights. Raises CheckpointError naming ``where``.
    """
    widths = read_widths(state, where)
    grammar = release_grammar(widths)
    missing = [k for k in grammar if k not in state]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} of the {len(grammar)} VRE tensors (e.g. {missing[0]})")
    for key, entry in grammar.items():
        if tuple(state[key].shape) != entry.shape:
            raise CheckpointError(f"{where}: {key} has shape {tuple(state[key].shape)}, the VRE grammar expects {entry.shape}")
        if not state[key].is_floating_point():
            raise CheckpointError(f"{where}: {key} is {state[key].dtype}, not a floating-point tensor")
    filtered: dict[str, int] = {}
    for key in state:
        if key in grammar:
            continue
        cat = _category(key)
        if not cat:
            raise CheckpointError(f"{where}: unexpected VRE tensor {key} (not in the release grammar)")
        filtered[cat] = filtered.get(cat, 0) + 1
    tensors: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, entry in grammar.items():
        if entry.ours is None:
            unused.append(key)
            continue
        t = state[key]
        if entry.ours.endswith(_ATTN_LINEAR_WEIGHTS):  # 1×1 conv (C, C, 1, 1) → Linear (C, C)
            t = t.reshape(t.shape[0], t.shape[1])
        tensors[entry.ours] = t
    params = sum(state[k].numel() for k in grammar)
    return VreImport(tensors, widths, len(grammar), params, unused, filtered)


def import_projection(state: dict[str, torch.Tensor], widths: VreWidths, where: str) -> tuple[dict[str, torch.Tensor], int, int]:
    """Map ``embedding_change_weights.pth`` (conv1/conv2 1×1 Conv1d) onto ``proj_in``/``proj_out`` Linears.

    Returns (tensors, hidden width, output width). Shapes: conv1 (h, e_dim, 1), conv2 (cross, h, 1).
    Raises CheckpointError naming ``where`` on missing, extra or misshaped tensors.
    """
    want = {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}
    if set(state) != want:
        extra = sorted(set(state) - want)
        lacking = sorted(want - set(state))
        raise CheckpointError(f"{where} is not the VRE projection (embedding_change_weights.pth): "
                              + (f"missing {lacking[0]}" if lacking else f"unexpected {extra[0]}") + f" ({len(state)} tensors)")
    w1, b1, w2, b2 = (state[k] for k in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"))
    h = w1.shape[0]
    ok = (w1.ndim == 3 and w1.shape[1:] == (widths.embed_dim, 1) and tuple(b1.shape) == (h,)
          and w2.ndim == 3 and w2.shape[1:] == (h, 1) and tuple(b2.shape) == (w2.shape[0],))
    if not ok:
        raise CheckpointError(f"{where}: projection shapes conv1 {tuple(w1.shape)}, conv2 {tuple(w2.shape)} do not fit a "
                              f"VRE with {widths.embed_dim}-wide codes (expected conv1 (h, {widths.embed_dim}, 1), conv2 (out, h, 1))")
    tensors = {"proj_in.weight": w1[:, :, 0], "proj_in.bias": b1, "proj_out.weight": w2[:, :, 0], "proj_out.bias": b2}
    return tensors, h, w2.shape[0]


def embedder_config(widths: VreWidths, proj_hidden: int, cross_attention_dim: int) -> EmbedderConfig:
    """Our EmbedderConfig for a release VRE of these widths (double normalisation, 512 px input, 77 tokens)."""
    return EmbedderConfig(
        in_channels=widths.in_channels,
        block_out_channels=tuple(widths.ch * m for m in LEVEL_MULT),
        layers_per_block=BLOCKS,
        norm_num_groups=NORM_GROUPS,
        z_channels=widths.z_channels,
        codebook_size=widths.n_embed,
        num_tokens=NUM_TOKENS,
        proj_hidden=proj_hidden,
        cross_attention_dim=cross_attention_dim,
        double_normalize=True,
        attention_levels=(ATTN_LEVEL,),
        input_size=VRE_INPUT_SIZE,
    )
