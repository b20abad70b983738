"""What the toolchain needs to know about each model kind's module tree, in one place.

Quantization scope, the 8-bit first/last layers, the forward order of blocks, the calibration
stages, the producer → consumer pairs that a channel transform can be folded into, the export
parts and the constant time path are facts about a model kind's module paths (``unet.conv_out``,
``vae.encoder.conv_out`` …). Every package that needs one asks this module — ``topology_of(model)``
or ``topology(kind)`` — instead of spelling module names itself. It imports nothing from the
toolchain but its errors, so any package may use it.

Kinds:
  * ``osdface`` — diffusers ``UNet2DConditionModel`` as ``unet``, ``AutoencoderKL`` as ``vae`` and the
    visual prompt embedder as ``embedder`` (``toolchain.models``). Upstream: OSDFace ``infer.py``.
  * ``osediff`` — the same ``unet`` and ``vae`` with a constant prompt buffer and no embedder.
    Upstream: OSEDiff ``osediff.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from toolchain.errors import ConfigError


@dataclass(frozen=True)
class Topology:
    """Module-path facts of one model kind (paths are relative to the top-level model)."""

    kind: str
    # default quantization scope: regexes over module paths (include, then exclude)
    quant_include: tuple[str, ...]
    quant_exclude: tuple[str, ...]
    # first/last layers PassionSR and EfficientDM keep at 8 bits (anchored regexes)
    first_last: tuple[str, ...]
    # component prefix → its children in the order the forward pass visits them (diffusers registers
    # ``up_blocks`` before ``mid_block``, so registration order is not forward order)
    forward_order: tuple[tuple[str, tuple[str, ...]], ...]
    # calibration stage → component prefixes it owns (PassionSR's distributed calibration)
    stages: Mapping[str, tuple[str, ...]]
    # (consumer, producer): consumer's input is a linear function of producer's output alone, so an
    # input transform of the consumer folds into the producer's output channels. Attention
    # ``to_out.0`` ← ``to_v`` pairs are found structurally (any diffusers Attention) in addition.
    producer_pairs: tuple[tuple[str, str], ...]
    # export parts (each a method of the model: see toolchain/export/parts.py)
    export_parts: tuple[str, ...]
    # the time path a one-step model evaluates at a fixed timestep: modules under ``time_root``
    # named exactly one of ``time_modules`` or ending with one of ``time_suffixes``
    time_root: str
    time_modules: tuple[str, ...]
    time_suffixes: tuple[str, ...]
    # modules whose only input is a constant prompt embedding (anchored regexes over module paths): their
    # outputs are constants, so they stay out of the quantization scope and fold into buffers
    constant_prompt_modules: tuple[str, ...] = ()

    def is_constant_prompt_module(self, path: str) -> bool:
        """Whether module ``path`` sees only the constant prompt (its output is a constant)."""
        return any(re.search(p, path) for p in self.constant_prompt_modules)

    def is_time_module(self, name: str) -> bool:
        """Whether ``name`` (a path relative to ``time_root``) is part of the constant time path."""
        return name in self.time_modules or any(name.endswith(s) for s in self.time_suffixes)

    def stage_of(self, path: str) -> str:
        """The calibration stage that owns module ``path`` ("other" if none)."""
        for stage, prefixes in self.stages.items():
            if any(path == p or path.startswith(p + ".") for p in prefixes):
                return stage
        return "other"


_OSDFACE = Topology(
    kind="osdface",
    quant_include=(r"^unet\.", r"^vae\."),  # the paper quantizes UNet and VAE; the VRE stays float
    # The time-embedding MLP and the per-resnet time projections see only the fixed timestep of a
    # one-step model: their outputs are constants every runtime folds away, so they are not quantized.
    quant_exclude=(r"time_emb",),
    first_last=(r"^unet\.conv_out$", r"^vae\.quant_conv$", r"^vae\.post_quant_conv$", r"^vae\.encoder\.conv_out$",
                r"^vae\.decoder\.conv_out$"),
    forward_order=(
        ("embedder.encoder", ("conv_in", "down_blocks", "mid_block", "conv_out")),
        ("embedder.quant_conv", ()),
        ("embedder", ()),  # projection layers after the codebook
        ("vae.encoder", ("conv_in", "down_blocks", "mid_block", "conv_out")),
        ("vae.quant_conv", ()),
        ("unet", ("conv_in", "time_embedding", "down_blocks", "mid_block", "up_blocks", "conv_out")),
        ("vae.post_quant_conv", ()),
        ("vae.decoder", ("conv_in", "mid_block", "up_blocks", "conv_out")),
    ),
    stages=MappingProxyType({
        "unet": ("unet", "embedder"),
        "vae_encoder": ("vae.encoder", "vae.quant_conv"),
        "vae_decoder": ("vae.post_quant_conv", "vae.decoder"),
    }),
    producer_pairs=(
        ("vae.quant_conv", "vae.encoder.conv_out"),
        ("embedder.quant_conv", "embedder.encoder.conv_out"),
        ("vae.decoder.conv_in", "vae.post_quant_conv"),
    ),
    export_parts=("full", "unet", "vae_encoder", "vae_decoder", "embedder"),
    time_root="unet",
    time_modules=("time_embedding",),
    time_suffixes=("time_emb_proj",),
)

# diffusers names a transformer block's cross-attention ``attn2``; with OSEDiff's constant prompt its k/v
# projections map a constant to a constant (PassionSR feeds a fixed embedding too: UPSTREAM.md)
_OSEDIFF_CONSTANT_KV = r"^unet\..*\.attn2\.to_[kv]$"

_OSEDIFF = Topology(
    kind="osediff",
    quant_include=_OSDFACE.quant_include,
    quant_exclude=_OSDFACE.quant_exclude,
    first_last=_OSDFACE.first_last,
    forward_order=tuple((p, c) for p, c in _OSDFACE.forward_order if not p.startswith("embedder")),
    stages=MappingProxyType({"unet": ("unet",), "vae_encoder": _OSDFACE.stages["vae_encoder"],
                             "vae_decoder": _OSDFACE.stages["vae_decoder"]}),
    producer_pairs=tuple(pc for pc in _OSDFACE.producer_pairs if not pc[0].startswith("embedder")),
    export_parts=("full", "unet", "vae_encoder", "vae_decoder"),
    time_root="unet",
    time_modules=_OSDFACE.time_modules,
    time_suffixes=_OSDFACE.time_suffixes,
    constant_prompt_modules=(_OSEDIFF_CONSTANT_KV,),
)

TOPOLOGIES: Mapping[str, Topology] = MappingProxyType({t.kind: t for t in (_OSDFACE, _OSEDIFF)})
DEFAULT_KIND = "osdface"
# stage names any kind may use (method parameters are validated before a model is at hand)
STAGE_NAMES: tuple[str, ...] = tuple(dict.fromkeys(s for t in TOPOLOGIES.values() for s in t.stages))


def topology(kind: str) -> Topology:
    """The topology of model kind ``kind``; raises ConfigError for an unknown kind."""
    try:
        return TOPOLOGIES[kind]
    except KeyError:
        raise ConfigError(f"unknown model kind '{kind}' (known: {', '.join(TOPOLOGIES)})") from None


def topology_of(model: Any) -> Topology:
    """The topology of a built model: its ``config.kind`` (models without one are OSDFace-shaped)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "kind", None) if cfg is not None and not isinstance(cfg, Mapping) else None
    return topology(kind or DEFAULT_KIND)
