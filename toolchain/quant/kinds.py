"""Layer kinds: a coarse grouping of quantizable layers by role, from their module paths.

Used by the W4A4 analysis (error grouped by kind) and by QuantFace's per-kind activation observers
(``--param observers=unet.attn_qkv=mse,...``). The first matching pattern wins; the paths are those of
the ``osdface``/``osediff`` module trees (``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``).
"""

from __future__ import annotations

import re

from toolchain.errors import ConfigError
from toolchain.quant.quantizer import OBSERVERS, QuantSpec

# (kind, regex over the module path); first match wins
LAYER_KINDS: tuple[tuple[str, str], ...] = (
    ("unet.conv_io", r"^unet\.conv_(in|out)$"),
    ("unet.time_embedding", r"^unet\..*time_emb"),  # constant in a one-step model: out of the default scope
    ("unet.attn_proj", r"^unet\..*attentions\.\d+\.proj_(in|out)$"),
    ("unet.attn_qkv", r"^unet\..*\.attn\d\.to_[qkv]$"),
    ("unet.attn_out", r"^unet\..*\.attn\d\.to_out\.0$"),
    ("unet.ff", r"^unet\..*\.ff\.net\.\d+(\.proj)?$"),
    ("unet.conv", r"^unet\."),
    ("vae.image_io", r"^vae\.(encoder\.conv_in|decoder\.conv_out)$"),
    ("vae.latent_io", r"^vae\.(encoder\.conv_out|quant_conv|post_quant_conv|decoder\.conv_in)$"),
    ("vae.attn", r"^vae\..*attentions\.\d+\.to_"),
    ("vae.encoder_conv", r"^vae\.encoder\."),
    ("vae.decoder_conv", r"^vae\.decoder\."),
    ("embedder", r"^embedder\."),
)
KIND_NAMES: tuple[str, ...] = tuple(k for k, _ in LAYER_KINDS)
_COMPILED = tuple((k, re.compile(p)) for k, p in LAYER_KINDS)


def layer_kind(name: str) -> str:
    """The kind of the layer at module path ``name`` (one of ``KIND_NAMES``, or ``"other"``)."""
    for kind, rx in _COMPILED:
        if rx.search(name):
            return kind
    return "other"


def parse_observer(text: str, base: QuantSpec) -> QuantSpec:
    """``base`` with the observer named by ``text``: ``minmax``, ``mse``, ``percentile`` (base's
    percentile) or ``percentile:P`` (P in (50, 100]). Raises ConfigError naming the accepted forms."""
    name, _, arg = text.strip().partition(":")
    if name not in OBSERVERS or (arg and name != "percentile"):
        raise ConfigError(f"observer '{text}' is not one of {', '.join(OBSERVERS)} (or percentile:P, e.g. percentile:99.9)")
    pct = base.percentile
    if arg:
        try:
            pct = float(arg)
        except ValueError:
            raise ConfigError(f"observer '{text}': the percentile must be a number, e.g. percentile:99.9") from None
    return QuantSpec(base.bits, base.symmetric, base.per_channel, name, pct)


def parse_kind_observers(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``("unet.attn_qkv=mse", "*=minmax")`` → ``{"unet.attn_qkv": "mse", "*": "minmax"}``, validated:
    each item is KIND=OBSERVER with KIND one of ``KIND_NAMES`` or ``*`` (every other kind). Raises ConfigError."""
    out: dict[str, str] = {}
    probe = QuantSpec(8)
    for item in items:
        kind, sep, obs = str(item).partition("=")
        kind, obs = kind.strip(), obs.strip()
        if not sep or not kind or not obs:
            raise ConfigError(f"observers item '{item}' must look like KIND=OBSERVER (e.g. unet.attn_qkv=mse)")
        if kind != "*" and kind not in KIND_NAMES:
            raise ConfigError(f"observers item '{item}': unknown layer kind '{kind}' (known: *, {', '.join(KIND_NAMES)})")
        parse_observer(obs, probe)
        out[kind] = obs
    return out


def observer_for(name: str, mapping: dict[str, str]) -> str | None:
    """The observer text ``mapping`` gives layer ``name`` (its kind's entry, else ``*``, else None)."""
    return mapping.get(layer_kind(name), mapping.get("*"))
