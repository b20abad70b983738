"""Parameter and operation accounting per layer at a given input size.

Counts come from one forward pass with hooks, so they follow the real module tree:

* conv / linear MACs: output elements × (C_in / groups) × k_h × k_w (linear: × in_features);
* attention matrix products (QKᵀ and A·V): 2 × N_q × N_kv × inner_dim per image;
* parts that declare ``count_macs`` (online transforms, low-rank branches) count themselves.

Two conventions are reported side by side (DESIGN.md §1):

* **paper** – the QuantFace Table 2 fit: conv/linear parameters at b_w/32 and ops = 2·MACs ×
  (b_w + b_a)/64 (the embedder stays float, so it counts in full); low-rank branches, online
  transforms and attention products are not charged.
* **honest** – everything charged: bytes on disk at each tensor's real width (branches at
  16 bit), and bit-operations BOPs = MACs × b_w × b_a (float at 32×32, branches 16×16).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

FLOAT_BITS = 32
BRANCH_BITS = 16


@dataclass
class LayerCount:
    name: str
    kind: str  # conv2d | linear | attention | transform | branch
    part: str  # unet | vae | embedder | other
    params: int = 0
    macs: int = 0
    w_bits: int = FLOAT_BITS
    a_bits: int = FLOAT_BITS


@dataclass
class Accounting:
    image_size: int
    layers: list[LayerCount] = field(default_factory=list)

    def totals(self) -> dict[str, Any]:
        by_part: dict[str, dict[str, int]] = defaultdict(lambda: {"params": 0, "macs": 0})
        for l in self.layers:
            by_part[l.part]["params"] += l.params
            by_part[l.part]["macs"] += l.macs
        return dict(by_part)

    def paper_convention(self) -> dict[str, float]:
        params_eq = 0.0
        flops_eq = 0.0
        for l in self.layers:
            if l.kind in ("attention", "transform", "branch"):
                continue
            params_eq += l.params * l.w_bits / FLOAT_BITS
            flops_eq += 2 * l.macs * (l.w_bits + l.a_bits) / (2 * FLOAT_BITS)
        return {"params_M": params_eq / 1e6, "ops_G": flops_eq / 1e9}

    def honest(self) -> dict[str, float]:
        size_bits = 0.0
        bops = 0.0
        for l in self.layers:
            size_bits += l.params * l.w_bits
            bops += l.macs * l.w_bits * l.a_bits
        return {"size_MB": size_bits / 8 / 1e6, "bops_G": bops / 1e9, "macs_G": sum(l.macs for l in self.layers) / 1e9,
                "params_M": sum(l.params for l in self.layers) / 1e6}

    def to_dict(self, per_layer: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"image_size": self.image_size, "totals": self.totals(), "paper": self.paper_convention(), "honest": self.honest()}
        if per_layer:
            d["layers"] = [asdict(l) for l in self.layers]
        return d


def _part(name: str) -> str:
    head = name.split(".", 1)[0]
    return head if head in ("unet", "vae", "embedder") else "other"


def _conv_macs(m: nn.Conv2d, out: torch.Tensor) -> int:
    kh, kw = m.kernel_size
    return int(out[0].numel() * (m.in_channels // m.groups) * kh * kw)


def _linear_macs(m: nn.Linear, out: torch.Tensor) -> int:
    return int(out[0].numel() * m.in_features)


def _bits(m: nn.Module) -> tuple[int, int]:
    wq = getattr(m, "weight_quantizer", None)
    aq = getattr(m, "input_quantizer", None)
    return (wq.bits if wq is not None else FLOAT_BITS, aq.bits if aq is not None else FLOAT_BITS)


def count(model: nn.Module, example: torch.Tensor) -> Accounting:
    """Run ``model(example)`` (batch 1) and count every layer."""
    from diffusers.models.attention_processor import Attention

    acc = Accounting(image_size=int(example.shape[-1]))
    names = {m: n for n, m in model.named_modules()}
    inside_branch = {m for n, mod in model.named_modules() if n.endswith(".lowrank") or n.endswith(".input_transform") for m in mod.modules()}
    handles = []

    def conv_linear_hook(m, inp, out):
        if m in inside_branch:
            return
        w_bits, a_bits = _bits(m)
        macs = _conv_macs(m, out) if isinstance(m, nn.Conv2d) else _linear_macs(m, out)
        params = m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        acc.layers.append(LayerCount(names[m], "conv2d" if isinstance(m, nn.Conv2d) else "linear", _part(names[m]), params, macs, w_bits, a_bits))

    def attention_hook(m, args, kwargs, out):
        hs = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states") if kwargs.get("encoder_hidden_states") is not None else (args[1] if len(args) > 1 else None)
        n_q = hs.shape[2] * hs.shape[3] if hs.dim() == 4 else hs.shape[1]
        n_kv = n_q if ctx is None else ctx.shape[1]
        macs = 2 * n_q * n_kv * m.inner_dim
        acc.layers.append(LayerCount(names[m] + ".attn_matmuls", "attention", _part(names[m]), 0, int(macs)))

    def self_counting_hook(m, inp, out):
        kind, params, macs = m.count_macs(inp[0], out)
        acc.layers.append(LayerCount(names[m], kind, _part(names[m]), params, int(macs), BRANCH_BITS if kind == "branch" else FLOAT_BITS,
                                     BRANCH_BITS if kind == "branch" else FLOAT_BITS))

    for m in model.modules():
        if hasattr(m, "count_macs"):
            handles.append(m.register_forward_hook(self_counting_hook))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(conv_linear_hook))
        elif isinstance(m, Attention):
            handles.append(m.register_forward_hook(attention_hook, with_kwargs=True))
    from toolchain.quant.calibrate import quantizers_off

    try:
        with torch.no_grad(), quantizers_off(model):  # counts depend on shapes only
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return acc
