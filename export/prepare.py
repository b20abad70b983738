"""The shared folding step: quantized checkpoint → export-ready PyTorch module.

Every quantized layer becomes an ``ExportQuantLayer`` holding only what a runtime needs:
the integer weight (W − L1·L2 residual when a branch is tied) and its per-channel scale, the
activation scale / zero point / container and the clamp for sub-8-bit designs, the online
transform (multiplier + Hadamard factors) and the merged low-rank branch in float16. Offline
transforms are already inside the weights. Both backends (ONNX, TFLite) start from this module;
anything it cannot represent raises ExportError naming the layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.ops import ActQDQ, Fp16Weight, Hadamard, WeightDQ
from toolchain.balance.hadamard import _block, factorize, sylvester
from toolchain.balance.transform import OnlineBalance
from toolchain.errors import ExportError
from toolchain.quant.calibrate import quant_layers, set_submodule
from toolchain.quant.layers import QuantConv2d
from toolchain.topology import topology_of


@dataclass
class ActInfo:
    bits: int
    symmetric: bool
    scale: float
    zero_point: int
    container: str  # uint8 | int8 | uint16 | int16
    clamp: bool
    lo: float
    hi: float


def container_for(bits: int, symmetric: bool) -> tuple[str, torch.dtype, int, int]:
    """Smallest standard integer type holding the designed grid: (name, dtype, min, max)."""
    if bits <= 8:
        return ("int8", torch.int8, -128, 127) if symmetric else ("uint8", torch.uint8, 0, 255)
    if bits <= 16:
        return ("int16", torch.int16, -32768, 32767) if symmetric else ("uint16", torch.uint16, 0, 65535)
    raise ValueError(bits)


def hadamard_factors(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_m, H_p/√n) so that H_n·x = H_m · X · H_pᵀ over x reshaped to (m, p)."""
    m, p = factorize(n)
    hm = torch.tensor(_block(m) if m > 1 else np.ones((1, 1)), dtype=torch.float32)
    hp = torch.tensor(sylvester(p), dtype=torch.float32) / float(np.sqrt(n))
    return hm, hp


class ExportQuantLayer(nn.Module):
    """``flavour="qdq"``: explicit quantize/dequantize ops (ONNX). ``flavour="float"``: a float graph
    with dequantized weights and a clamp to the designed activation range, which a TFLite
    quantizer turns into integer ops with exactly these ranges (TFLite backend)."""

    def __init__(self, name: str, layer: nn.Module, flavour: str = "qdq"):
        super().__init__()
        self.name = name
        self.flavour = flavour
        self.output_range: tuple[float, float] | tuple[()] | None = None  # float flavour: conv/linear output range, when collecting
        self.is_conv = isinstance(layer, QuantConv2d)
        if self.is_conv:
            self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
            if layer.padding_mode != "zeros":
                raise ExportError(f"layer {name}: padding_mode '{layer.padding_mode}' is not supported by the exporters")
        self._init_transform(layer)
        self._init_activation(layer)
        self._init_weight(layer)
        self._init_branch(layer)
        self.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False) if layer.bias is not None else None

    def _init_transform(self, layer) -> None:
        t = layer.input_transform
        self.has_transform = not isinstance(t, nn.Identity)
        self.rotate = False
        if not self.has_transform:
            return
        if not isinstance(t, OnlineBalance):
            raise ExportError(f"layer {self.name}: unsupported input transform {type(t).__name__} (exporters know OnlineBalance)")
        if t.rotate and t.block != t.channels:
            raise ExportError(f"layer {self.name}: a block-diagonal online rotation (block {t.block} of {t.channels}) cannot be exported")
        self.register_buffer("multiplier", t.multiplier.detach().float().clone())
        self.register_buffer("shift", t.shift.detach().float().clone() if t.shift is not None else None)
        self.rotate = t.rotate
        if t.rotate:
            hm, hp = hadamard_factors(t.channels)
            self.register_buffer("hadamard_m", hm)
            self.register_buffer("hadamard_p", hp)

    def _init_activation(self, layer) -> None:
        q = layer.input_quantizer
        self.act: ActInfo | None = None
        if q is None:
            return
        if q.spec.per_channel:
            raise ExportError(f"layer {self.name}: per-channel (split) activation quantization is not supported by the exporters; "
                              "for Q-Diffusion quantize with params {\"split_shortcut\": false} to export")
        if not bool(q.initialized):
            raise ExportError(f"layer {self.name}: activation quantizer was never calibrated")
        name, dtype, cmin, cmax = container_for(q.spec.bits, q.spec.symmetric)
        scale = float(q.scale.reshape(-1)[0])
        zp = int(round(float(q.zero_point.reshape(-1)[0])))
        clamp = q.spec.qmin > cmin or q.spec.qmax < cmax
        lo, hi = (q.spec.qmin - zp) * scale, (q.spec.qmax - zp) * scale
        self.act = ActInfo(q.spec.bits, q.spec.symmetric, scale, zp, name, clamp, lo, hi)
        self.qmin, self.qmax = q.spec.qmin, q.spec.qmax
        if self.flavour == "float":
            return
        self.register_buffer("act_scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("act_zero_point", torch.tensor(zp, dtype=dtype))
        self.register_buffer("act_lo", torch.tensor(lo, dtype=torch.float32))
        self.register_buffer("act_hi", torch.tensor(hi, dtype=torch.float32))

    def _init_weight(self, layer) -> None:
        wq = layer.weight_quantizer
        w = layer.weight_to_quantize().detach().float()
        self.w_bits = wq.bits if wq is not None else None
        if wq is None:
            self.register_buffer("weight_float", w.clone())
            return
        if wq.bits > 8:
            raise ExportError(f"layer {self.name}: {wq.bits}-bit weights are not supported (exporters store weights in 4 or 8 bits)")
        if not wq.spec.symmetric:
            raise ExportError(f"layer {self.name}: asymmetric weight quantization is not supported (exporters use symmetric weights)")
        scale = wq.scale.detach().float().reshape(-1)
        if scale.numel() == 1:
            scale = scale.expand(w.shape[0]).clone()
        s = scale.reshape(-1, *([1] * (w.dim() - 1)))
        w_int = torch.clamp(torch.round(w / s), wq.spec.qmin, wq.spec.qmax).to(torch.int8)
        if self.flavour == "float":  # integer constants do not survive the TFLite converter; keep W_int·s
            self.register_buffer("weight_float", w_int.float() * s)
            # plain attributes (not in the traced graph): the TFLite backend writes these exact integers and scales back
            self.design_weight_int, self.design_weight_scale = w_int, scale.clone()
            return
        self.register_buffer("weight_int", w_int)
        self.register_buffer("weight_scale", scale.clone())

    def _init_branch(self, layer) -> None:
        self.has_branch = layer.lowrank is not None and layer.lowrank.active_parts()
        if not self.has_branch:
            return
        parts = [layer.lowrank.parts[n] for n in layer.lowrank.active_parts()]
        down = torch.cat([p.down.weight.detach() for p in parts], dim=0)
        up = torch.cat([p.up.weight.detach() for p in parts], dim=1)
        self.register_buffer("branch_down", down.to(torch.float16))
        self.register_buffer("branch_up", up.to(torch.float16))
        self.branch_rank = up.shape[1]

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "conv2d" if self.is_conv else "linear", "w_bits": self.w_bits, "transform": self.has_transform,
                             "rotate": self.rotate, "branch_rank": getattr(self, "branch_rank", 0)}
        if self.act is not None:
            d["act"] = self.act.__dict__.copy()
        return d

    def _linear_op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return F.conv2d(x, w, self.bias, **self.conv_args)
        return F.linear(x, w, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_transform:
            axis = 1 if self.is_conv else -1
            shape = [1] * x.dim()
            shape[axis] = -1
            if self.shift is not None:
                x = x - self.shift.reshape(shape)
            x = x * self.multiplier.reshape(shape)
            if self.rotate:
                x = Hadamard.apply(x, self.hadamard_m, self.hadamard_p, self.is_conv) if self.flavour == "qdq" else \
                    Hadamard.forward(None, x, self.hadamard_m, self.hadamard_p, self.is_conv)
        branch_in = x
        if self.flavour == "float":
            return self._float_forward(x, branch_in)
        if self.act is not None:
            x = ActQDQ.apply(x, self.act_scale, self.act_zero_point, self.act_lo, self.act_hi, self.qmin, self.qmax, self.act.clamp)
        w = WeightDQ.apply(self.weight_int, self.weight_scale) if self.w_bits is not None else self.weight_float
        return self._add_branch(self._linear_op(x, w), branch_in, Fp16Weight.apply)

    def _float_forward(self, x: torch.Tensor, branch_in: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            # Always clamp: exact for designs narrower than the container, inert otherwise (quantization
            # saturates there anyway), and it stops the converter from folding upstream scalings into
            # this layer's weights, which would change the tensor whose range we designed.
            x = torch.clamp(x, self.act.lo, self.act.hi)
        y = self._linear_op(x, self.weight_float)
        if self.output_range is not None:  # set only while collecting ranges, never while tracing
            lo, hi = float(y.min()), float(y.max())
            self.output_range = (min(lo, self.output_range[0]), max(hi, self.output_range[1])) if self.output_range else (lo, hi)
        return self._add_branch(y, branch_in, lambda t: t.float())

    def _add_branch(self, y: torch.Tensor, branch_in: torch.Tensor, cast) -> torch.Tensor:
        if self.has_branch:
            down, up = cast(self.branch_down), cast(self.branch_up)
            if self.is_conv:
                h = F.conv2d(branch_in, down, None, self.conv_args["stride"], self.conv_args["padding"], self.conv_args["dilation"])
                y = y + F.conv2d(h, up)
            else:
                y = y + F.linear(F.linear(branch_in, down), up)
        return y


class ConstantOutput(nn.Module):
    """Stands in for a module whose output does not depend on the model input."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.register_buffer("value", value.detach().clone())

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.value


@torch.no_grad()
def fold_time_path(module: nn.Module) -> int:
    """Replace the UNet's time-embedding MLP and every resnet's time projection by their (constant)
    outputs: a one-step model always runs at the same timestep. Saves their weights on disk
    (~80 MB of float32 on SD-2.1) and their work at run time; returns the modules replaced."""
    topo = topology_of(module)
    unet = getattr(module, topo.time_root, None)
    if unet is None or not any(topo.is_time_module(n) for n, _ in unet.named_modules()):
        return 0
    captured: dict[str, torch.Tensor] = {}
    targets = {n: m for n, m in unet.named_modules() if topo.is_time_module(n)}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: captured.__setitem__(n, o[:1])) for n, m in targets.items()]
    cfg = module.config
    z = torch.zeros(1, unet.config.in_channels, cfg.latent_size, cfg.latent_size)
    prompt = torch.zeros(1, *cfg.prompt_shape)
    try:
        module.denoise(z, prompt)
    finally:
        for h in hooks:
            h.remove()
    for name, value in captured.items():
        set_submodule(unet, name, ConstantOutput(value))
    return len(captured)


def export_module(model: nn.Module, flavour: str = "qdq") -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """A deep copy of ``model`` with every quantized layer replaced and the constant time path folded;
    returns (module, layer info)."""
    module = copy.deepcopy(model).cpu().float().eval()
    info: dict[str, dict[str, Any]] = {}
    for name, layer in list(quant_layers(module)):
        layer_export = ExportQuantLayer(name, layer, flavour)
        set_submodule(module, name, layer_export)
        info[name] = layer_export.describe()
    fold_time_path(module)
    for p in module.parameters():
        p.requires_grad_(False)
    return module, info
