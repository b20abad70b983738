"""Low-rank branches beside a quantized layer.

    y = Q(X')·Q(R) + X'·(L1·L2) [+ X'·(B·A)]        R = W − L1·L2   (tied SVD branch)

A branch is made of named *parts*, each a (down, up) pair: for a k×k conv, down is a k×k conv
to r channels (same stride/padding/dilation as the layer) and up a 1×1 conv back; for a linear,
two linears. Parts:

* ``svd``    – L2 (down) and L1 (up) from the SVD of the (balanced) weight; *tied*: the
               quantizer sees the residual W − L1·L2, recomputed from the current factors;
* ``lora``   – a standard LoRA pair (A Gaussian, B zero) trained by distillation; optionally
               added into the residual before quantization (``lora_into_residual``) so it ends up
               inside the low-bit weight and only the SVD branch stays 16-bit;
* ``merged`` – after training, the parts concatenated into one pair of rank r₁ + r₂ (the paper's
               eq. 10), with the layer weight replaced by the final residual.

The (down, up) modules are built by peft's LoRA layer classes (``peft.tuners.lora.layer.Linear`` /
``Conv2d``): they construct the k×k → r → 1×1 pair with the layer's stride/padding and the
Gaussian-A / zero-B initialisation (``init_lora_weights="gaussian"``). The forward pass is ours:
the branch must read the *balanced* input x' inside the quantized layer, tie the residual to the
quantizer and merge into plain convs for export, none of which peft's wrapper does. Branch
weights are stored in float16 (``weight_dtype``), which the forward pass emulates.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.quant.components import register_component

_HALF = (torch.float16, torch.bfloat16)
SKIP_ROUND_TRIP_UNDER_AUTOCAST = True  # see Pair._w (tests turn it off to compare)


def _twin(layer: nn.Module) -> nn.Module:
    """A float layer with the same hyper-parameters (peft needs a base layer to size the pair)."""
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                         layer.groups, bias=False, device="cpu")
    return nn.Linear(layer.in_features, layer.out_features, bias=False, device="cpu")


def peft_pair(layer: nn.Module, rank: int, seed: int | None = None) -> tuple[nn.Module, nn.Module]:
    """(down, up) modules built and initialised by peft (Gaussian A ~ N(0, 1/r), zero B)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Conv2d as LoraConv2d
    from peft.tuners.lora.layer import Linear as LoraLinear

    cfg = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian")
    cls = LoraConv2d if isinstance(layer, nn.Conv2d) else LoraLinear
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        wrapped = cls(_twin(layer), adapter_name="branch", r=rank, lora_alpha=rank, init_lora_weights="gaussian", config=cfg)
    down, up = wrapped.lora_A["branch"], wrapped.lora_B["branch"]
    return down.to(layer.weight.device, layer.weight.dtype), up.to(layer.weight.device, layer.weight.dtype)


class Pair(nn.Module):
    """up ∘ down with float16-stored weights."""

    def __init__(self, down: nn.Module, up: nn.Module, weight_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.down = down
        self.up = up
        self.weight_dtype = weight_dtype

    @property
    def rank(self) -> int:
        return self.up.weight.shape[1]

    def _w(self, w: torch.Tensor) -> torch.Tensor:
        """The weight as stored (rounded to ``weight_dtype``), in the compute dtype.

        Under 16-bit CUDA autocast every consumer (conv, linear, einsum) rounds the weight to the
        autocast dtype anyway: the round trip through float16 is then skipped (identical under fp16
        autocast; under bf16 it can differ by one bf16 ulp where the float16 value is a bf16 tie, and
        for |w| > 65504, which float16 cannot hold). It cost 2 kernels per use in forward and
        backward — a tenth of a QD-LoRA step on SD-2.1 (benchmarks/results/recipe_speed)."""
        if self.weight_dtype == w.dtype:
            return w
        if SKIP_ROUND_TRIP_UNDER_AUTOCAST and w.is_cuda and self.weight_dtype in _HALF and torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in _HALF:
            return w
        return w.to(self.weight_dtype).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.down, nn.Conv2d):
            h = F.conv2d(x, self._w(self.down.weight), None, self.down.stride, self.down.padding, self.down.dilation)
            return F.conv2d(h, self._w(self.up.weight))
        return F.linear(F.linear(x, self._w(self.down.weight)), self._w(self.up.weight))

    def dense(self) -> torch.Tensor:
        """The pair as one weight of the layer's shape (up · down)."""
        up = self._w(self.up.weight).flatten(1)  # (out, r)
        down = self._w(self.down.weight)
        return torch.einsum("or,r...->o...", up, down)

    def count(self, x: torch.Tensor) -> tuple[int, int]:
        h = self.down(x[:1])
        out = self.up(h)
        k = self.down.weight[0].numel()
        return self.down.weight.numel() + self.up.weight.numel(), h.numel() * k + out.numel() * self.rank


class LowRankBranch(nn.Module):
    def __init__(self, parts: dict[str, Pair], tied: bool = True, lora_into_residual: bool = False):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.tied = tied
        self.lora_into_residual = lora_into_residual

    def adjust_quantized_weight(self, weight: torch.Tensor) -> torch.Tensor:
        r = weight
        if self.tied and "svd" in self.parts:
            r = r - self.parts["svd"].dense()
        if self.lora_into_residual and "lora" in self.parts:
            r = r + self.parts["lora"].dense()
        return r

    def active_parts(self) -> list[str]:
        return [n for n in self.parts if not (n == "lora" and self.lora_into_residual)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for name in self.active_parts():
            y = self.parts[name](x)
            out = y if out is None else out + y
        return out if out is not None else torch.zeros((), device=x.device, dtype=x.dtype)

    @property
    def rank(self) -> int:
        return sum(self.parts[n].rank for n in self.active_parts())

    def describe(self) -> dict[str, Any]:
        return {"type": "lowrank", "parts": {n: p.rank for n, p in self.parts.items()}, "tied": self.tied,
                "lora_into_residual": self.lora_into_residual, "weight_dtype": str(next(iter(self.parts.values())).weight_dtype).split(".")[-1]}

    def count_macs(self, x: torch.Tensor, out: torch.Tensor) -> tuple[str, int, int]:
        params = macs = 0
        with torch.no_grad():
            for name in self.active_parts():
                p, m = self.parts[name].count(x)
                params, macs = params + p, macs + m
        return "branch", params, macs


@register_component("lowrank")
def _build_lowrank(desc: dict[str, Any], layer: nn.Module) -> nn.Module:
    dtype = getattr(torch, desc.get("weight_dtype", "float16"))
    parts = {}
    for name, rank in desc["parts"].items():
        down, up = peft_pair(layer, rank, seed=0)
        parts[name] = Pair(down, up, dtype)
    return LowRankBranch(parts, desc.get("tied", True), desc.get("lora_into_residual", False))


@torch.no_grad()
def svd_pair(layer: nn.Module, weight: torch.Tensor, rank: int, weight_dtype: torch.dtype = torch.float16) -> Pair:
    """L1 = U·Σ[:, :r] (up), L2 = Vᵀ[:r] (down) of the weight flattened to (out, in·k·k), in float64."""
    w2 = weight.detach().double().flatten(1)
    u, s, vh = torch.linalg.svd(w2, full_matrices=False)
    r = min(rank, s.numel())
    down, up = peft_pair(layer, r, seed=0)
    down.weight.copy_(vh[:r].reshape(r, *weight.shape[1:]).to(down.weight))
    up.weight.copy_((u[:, :r] * s[:r]).reshape(up.weight.shape).to(up.weight))
    return Pair(down, up, weight_dtype)


@torch.no_grad()
def merge_branch(layer: nn.Module) -> None:
    """Fold the trained parts into one rank-(r₁+r₂) pair and make the layer weight the final residual."""
    branch: LowRankBranch = layer.lowrank
    residual = layer.weight_to_quantize().detach().clone()
    keep = branch.active_parts()
    if not keep:
        layer.weight.copy_(residual)
        layer.lowrank = None
        return
    downs = [branch.parts[n].down for n in keep]
    ups = [branch.parts[n].up for n in keep]
    dtype = branch.parts[keep[0]].weight_dtype
    down, up = peft_pair(layer, sum(branch.parts[n].rank for n in keep), seed=0)
    down.weight.copy_(torch.cat([d.weight for d in downs], dim=0))
    up.weight.copy_(torch.cat([u.weight for u in ups], dim=1))
    layer.weight.copy_(residual)
    layer.lowrank = LowRankBranch({"merged": Pair(down, up, dtype)}, tied=False, lora_into_residual=False)
