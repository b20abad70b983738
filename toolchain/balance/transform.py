"""Rotation-scaling channel balancing (QuantFace §3.1), folded into weights where possible.

For a layer y = W·x over C input channels:

    s_c = max|X_c|^α / max|W_c|^(1−α)          (SmoothQuant scale)
    x'  = H · diag(σ / s) · x                  (randomized Hadamard, σ ∈ {±1}^C, H orthonormal)
    W'  = W · diag(s · σ) · Hᵀ                 (so W'·x' = W·x exactly)

Modes: ``none``, ``scale`` (H = I, σ = 1: SmoothQuant), ``rotate`` (s = 1: QuaRot-style),
``rotate-scale`` (both: QuantFace). The weight side is always folded offline. The activation
side is folded into the *producer* of x when x is a linear function of one layer's output:

* attention ``to_out.0`` ← ``to_v`` (the transform is block-diagonal per head, which commutes
  with the attention mix over tokens);
* the model kind's ``Topology.producer_pairs`` (``toolchain.topology``); for OSDFace: VAE
  ``quant_conv`` ← ``encoder.conv_out``, ``decoder.conv_in`` ← ``post_quant_conv`` and the embedder's
  ``quant_conv`` ← its ``encoder.conv_out``.

Everywhere else x comes from a nonlinearity or a normalisation (GroupNorm→SiLU→conv,
LayerNorm→q/k/v, GEGLU→FF-out, residual sums), so an ``OnlineBalance`` module applies the
elementwise scale and the fast Hadamard before the input quantizer. Orders with no Hadamard
matrix (e.g. the VAE's 3-channel ``conv_in``) are left unrotated and, when rotation was asked
for, their activations are kept at ``fallback_a_bits``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from toolchain.balance.hadamard import factorize, hadamard_transform, is_available, transform_ops
from toolchain.balance.stats import channel_axis, weight_input_absmax
from toolchain.quant.grid import along_axis
from toolchain.errors import ConfigError
from toolchain.topology import topology_of
from toolchain.quant.components import register_component

MODES = ("none", "scale", "rotate", "rotate-scale", "auto")
DENSE_ON_GPU = True  # OnlineBalance runs as one GEMM on CUDA (tests turn it off to compare with the factored transform)
AUTO_ALPHAS = (0.3, 0.5, 0.7)


@dataclass
class BalanceConfig:
    mode: str = "rotate-scale"
    alpha: float = 0.5
    seed: int = 0
    fallback_a_bits: int = 8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"balance mode '{self.mode}' is not one of {', '.join(MODES)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")

    @property
    def scales(self) -> bool:
        return self.mode in ("scale", "rotate-scale", "auto")

    @property
    def rotates(self) -> bool:
        return self.mode in ("rotate", "rotate-scale", "auto")


def rotate_axis(t: torch.Tensor, axis: int, block: int, transpose: bool = False) -> torch.Tensor:
    """Apply the orthonormal Hadamard transform to consecutive blocks of ``block`` entries of ``axis``."""
    moved = t.movedim(axis, -1)
    lead, c = moved.shape[:-1], moved.shape[-1]
    out = hadamard_transform(moved.reshape(*lead, c // block, block), dim=-1, transpose=transpose)
    return out.reshape(*lead, c).movedim(-1, axis)


def _broadcast(v: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    return along_axis(v, x.dim(), axis)


class OnlineBalance(nn.Module):
    """x' = H·(m ⊙ x) along the channel axis at run time (m = σ/s)."""

    def __init__(self, channels: int, axis: int, rotate: bool, block: int | None = None, shift: bool = False):
        super().__init__()
        self.channels = channels
        self.axis = axis
        self.rotate = rotate
        self.block = block or channels
        self.register_buffer("multiplier", torch.ones(channels))
        # x' = H·(m ⊙ (x − δ)): the per-channel offset δ of PassionSR's equivalent transformation
        self.register_buffer("shift", torch.zeros(channels) if shift else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis if self.axis >= 0 else x.dim() + self.axis
        if DENSE_ON_GPU and x.is_cuda and self.rotate and not torch.jit.is_tracing() and not self.multiplier.requires_grad:
            return self._forward_dense(x, axis)
        if self.shift is not None:
            x = x - _broadcast(self.shift.to(x.dtype), x, axis)
        x = x * _broadcast(self.multiplier.to(x.dtype), x, axis)
        if self.rotate:
            x = rotate_axis(x, axis, self.block)
        return x

    def dense_matrix(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole transform as one affine map: x' = M·x + b along the channel axis.

        M = H·diag(m) (C × C, block-diagonal when ``block`` < C), b = −M·δ (None without a shift),
        built in float64 by running the factored fast transform on the identity (so it is the same
        map by construction) and returned in ``dtype`` on the multiplier's device.
        """
        with torch.no_grad():
            eye = torch.diag(self.multiplier.detach().double())  # row i = m_i · e_i
            mt = rotate_axis(eye, -1, self.block)  # row i = T(m_i e_i) = column i of M
            m = mt.t().contiguous()
            b = -(m @ self.shift.detach().double()) if self.shift is not None else None
        return m.to(dtype), (b.to(dtype) if b is not None else None)

    def _forward_dense(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """GPU path: the transform as one GEMM (M cached until the multiplier/shift change).

        The factored transform costs ≈ 3 small kernels per butterfly level in forward and as many in
        backward, which dominates a launch-bound training step; one GEMM of C² MACs per position is
        far cheaper on a GPU and, under bf16 autocast, more accurate (fp32 accumulation instead of a
        bf16 rounding per butterfly level). Same map as the CPU path to float rounding (a test)."""
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        key = (self.multiplier.data_ptr(), self.multiplier._version, self.shift._version if self.shift is not None else -1, dtype, x.device)
        cache = getattr(self, "_dense_cache", None)
        if cache is None or cache[0] != key:
            m, b = self.dense_matrix()
            cache = self._dense_cache = (key, m.to(x.device, dtype), b.to(x.device, dtype) if b is not None else None)
        _, m, b = cache
        if axis == x.dim() - 1:
            return torch.nn.functional.linear(x, m, b)
        c = x.shape[axis]
        y = torch.matmul(m, x.reshape(-1, c, x[(0,) * axis].numel() // c))
        if b is not None:
            y = y + b.reshape(-1, 1)
        return y.reshape(x.shape)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "balance", "channels": self.channels, "axis": self.axis, "rotate": self.rotate, "block": self.block}
        if self.shift is not None:
            d["shift"] = True
        if self.rotate:
            d["hadamard_factors"] = list(factorize(self.block))
        return d

    def count_macs(self, x: torch.Tensor, out: torch.Tensor) -> tuple[str, int, int]:
        positions = x[0].numel() // self.channels
        per = self.channels * (2 if self.shift is not None else 1)  # the elementwise offset and scale
        if self.rotate:
            ops = transform_ops(self.block)
            per += (self.channels // self.block) * (ops["adds"] + ops["macs"])
        return "transform", self.multiplier.numel(), positions * per


@register_component("balance")
def _build_balance(desc: dict[str, Any], layer: nn.Module) -> nn.Module:
    return OnlineBalance(desc["channels"], desc["axis"], desc["rotate"], desc.get("block"), desc.get("shift", False))


@dataclass
class LayerPlan:
    name: str
    channels: int
    scale: torch.Tensor  # s (ones when not scaling)
    signs: torch.Tensor  # σ (ones when not rotating)
    rotate: bool
    block: int
    producer: str | None = None  # fold x' = T·x into this module's output rows instead of online
    mode: str = ""
    alpha: float | None = None

    # s and σ are float64 so a float64 model folds exactly; they are cast to the weights' dtype.
    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, "alpha": self.alpha, "rotate": self.rotate, "block": self.block, "folded_into": self.producer,
                "scale_range": [float(self.scale.min()), float(self.scale.max())]}

    def transform_input(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        x = x * _broadcast((self.signs / self.scale).to(x), x, axis)
        return rotate_axis(x, axis, self.block) if self.rotate else x

    def transform_weight(self, w: torch.Tensor) -> torch.Tensor:
        w = w * _broadcast((self.scale * self.signs).to(w), w, 1)
        return rotate_axis(w, 1, self.block) if self.rotate else w


def _signs(seed: int, name: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


def fold_producers(model: nn.Module) -> dict[str, tuple[str, int]]:
    """consumer → (producer, rotation block) pairs where x' = T·x can be folded into the producer."""
    from diffusers.models.attention_processor import Attention

    pairs: dict[str, tuple[str, int]] = {}
    names = dict(model.named_modules())
    for name, m in names.items():
        if isinstance(m, Attention) and isinstance(getattr(m, "to_v", None), nn.Linear) and m.to_out is not None:
            inner = m.to_v.out_features
            pairs[f"{name}.to_out.0"] = (f"{name}.to_v", inner // m.heads)
    for consumer, producer in topology_of(model).producer_pairs:
        if consumer in names and producer in names:
            pairs[consumer] = (producer, names[consumer].in_channels)
    return pairs


def _layer_plan(name: str, layer: nn.Module, absmax: torch.Tensor, producer: str | None, block: int,
                mode: str, alpha: float, seed: int) -> LayerPlan:
    c = absmax.numel()
    if mode in ("scale", "rotate-scale"):
        x_max = absmax.double().cpu().clamp(min=1e-5)
        w_max = weight_input_absmax(layer.weight).double().cpu().clamp(min=1e-5)
        s = x_max.pow(alpha) / w_max.pow(1.0 - alpha)
        s = s / math.exp(float(s.log().mean()))  # unit geometric mean: keeps magnitudes stable
    else:
        s = torch.ones(c, dtype=torch.float64)
    rotate = mode in ("rotate", "rotate-scale") and is_available(block)
    signs = _signs(seed, name, c) if rotate else torch.ones(c, dtype=torch.float64)
    return LayerPlan(name, c, s, signs, rotate, block if rotate else c, producer, mode, alpha if mode in ("scale", "rotate-scale") else None)


def _eligible(layers: dict[str, nn.Module], absmax: dict[str, torch.Tensor]):
    for name, layer in layers.items():
        if name not in absmax:
            continue  # the layer never ran on the calibration data
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            continue
        yield name, layer


def plan_balancing(model: nn.Module, layers: dict[str, nn.Module], absmax: dict[str, torch.Tensor], cfg: BalanceConfig,
                   batches: list[torch.Tensor] | None = None, forward=None) -> dict[str, LayerPlan]:
    """Choose s, σ and the Hadamard block for every layer (from the *original* weights and stats).

    ``mode="auto"`` (an extension beyond the paper) evaluates none / scale / rotate / rotate-scale
    (α ∈ AUTO_ALPHAS) per layer on ``batches`` and keeps the candidate with the smallest output
    error ‖W·x − Q(W')·Q(T·x)‖² at the layer's own bit-widths.
    """
    if cfg.mode == "none":
        return {}
    producers = fold_producers(model)
    plans: dict[str, LayerPlan] = {}
    candidates: dict[str, list[LayerPlan]] = {}
    for name, layer in _eligible(layers, absmax):
        producer, block = producers.get(name, (None, absmax[name].numel()))
        if cfg.mode != "auto":
            plans[name] = _layer_plan(name, layer, absmax[name], producer, block, cfg.mode, cfg.alpha, cfg.seed)
            continue
        options = [("none", cfg.alpha), ("rotate", cfg.alpha)] + [(m, a) for m in ("scale", "rotate-scale") for a in AUTO_ALPHAS]
        candidates[name] = [_layer_plan(name, layer, absmax[name], producer, block, m, a, cfg.seed) for m, a in options]
    if candidates:
        if not batches:
            raise ConfigError("balance mode 'auto' needs calibration batches to compare candidates")
        plans.update(select_by_output_error(model, layers, candidates, batches, forward))
    return plans


def select_by_output_error(model: nn.Module, layers: dict[str, nn.Module], candidates: dict[str, list[LayerPlan]],
                           batches: list[torch.Tensor], forward=None) -> dict[str, LayerPlan]:
    """Per layer, the candidate transform with the smallest quantized-output MSE on the batches."""
    from toolchain.quant.quantizer import QuantSpec, fake_quantize, qparams_from_range

    from tqdm.auto import tqdm

    from toolchain.balance.stats import _quiet_rank

    errors = {name: torch.zeros(len(c), dtype=torch.float64) for name, c in candidates.items()}
    handles = []
    bar = tqdm(total=len(candidates) * len(batches), desc="balance auto: candidate transforms per layer", unit="layer",
               leave=False, disable=_quiet_rank())

    def hook_for(name: str, layer: nn.Module):
        axis = channel_axis(layer)
        w_spec = layer.weight_quantizer.spec if getattr(layer, "weight_quantizer", None) is not None else None
        a_spec = layer.input_quantizer.spec if getattr(layer, "input_quantizer", None) is not None else QuantSpec(8)

        def run(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return layer._apply_weight(x, w) if hasattr(layer, "_apply_weight") else nn.functional.linear(x, w)

        def hook(mod, args):
            x = args[0].detach()
            with torch.no_grad():
                ref = run(layer.weight, x)
                for i, plan in enumerate(candidates[name]):
                    xt = plan.transform_input(x, axis if axis >= 0 else x.dim() + axis)
                    s, z = qparams_from_range(xt.min(), xt.max(), a_spec)
                    xq = fake_quantize(xt, s, z, a_spec.qmin, a_spec.qmax)
                    wt = plan.transform_weight(layer.weight)
                    if w_spec is not None:
                        amax = wt.abs().flatten(1).amax(1).clamp(min=1e-8)
                        ws = _broadcast(amax / w_spec.qmax, wt, 0)
                        wt = fake_quantize(wt, ws, torch.zeros_like(ws), w_spec.qmin, w_spec.qmax)
                    errors[name][i] += float((run(wt, xq) - ref).double().pow(2).sum())
            bar.update(1)

        return hook

    for name in candidates:
        handles.append(layers[name].register_forward_pre_hook(hook_for(name, layers[name])))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for b in batches:
                (forward or model)(b.to(device))
    finally:
        bar.close()
        for h in handles:
            h.remove()
    return {name: candidates[name][int(torch.argmin(errors[name]))] for name in candidates}


@torch.no_grad()
def _fold_consumer(layer: nn.Module, plan: LayerPlan) -> None:
    """W ← W · diag(s·σ) · Hᵀ (input-channel axis 1)."""
    layer.weight.copy_(plan.transform_weight(layer.weight))


@torch.no_grad()
def _fold_producer(producer: nn.Module, plan: LayerPlan) -> None:
    """P ← H · diag(σ/s) · P (output axis 0), bias likewise."""
    m = (plan.signs / plan.scale).to(producer.weight)
    producer.weight.mul_(_broadcast(m, producer.weight, 0))
    if plan.rotate:
        producer.weight.copy_(rotate_axis(producer.weight, 0, plan.block))
    if producer.bias is not None:
        producer.bias.mul_(m)
        if plan.rotate:
            producer.bias.copy_(rotate_axis(producer.bias, 0, plan.block))


def apply_balancing(model: nn.Module, plans: dict[str, LayerPlan]) -> None:
    """Fold every plan into the weights; install OnlineBalance where the producer cannot absorb it."""
    for name, plan in plans.items():
        layer = model.get_submodule(name)
        _fold_consumer(layer, plan)
        if plan.producer is not None:
            _fold_producer(model.get_submodule(plan.producer), plan)
        else:
            online = OnlineBalance(plan.channels, channel_axis(layer), plan.rotate, plan.block)
            online.multiplier = (plan.signs / plan.scale).to(layer.weight)
            layer.input_transform = online.to(layer.weight.device)


@dataclass
class BalanceReport:
    config: dict[str, Any]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    unrotated: list[str] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        modes: dict[str, int] = {}
        for d in self.layers.values():
            key = d["mode"] + (f"@{d['alpha']}" if d["alpha"] is not None else "")
            modes[key] = modes.get(key, 0) + 1
        return {"config": self.config, "online": len(self.layers) - len(self.folded), "folded": self.folded,
                "modes": modes, "unrotated_for_lack_of_hadamard": self.unrotated}


def balance_report(plans: dict[str, LayerPlan], cfg: BalanceConfig) -> BalanceReport:
    rep = BalanceReport(asdict(cfg))
    for name, p in plans.items():
        rep.layers[name] = p.summary()
        if p.producer is not None:
            rep.folded.append(name)
        if p.mode in ("rotate", "rotate-scale") and not p.rotate:
            rep.unrotated.append(name)
    return rep
