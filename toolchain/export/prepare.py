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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from toolchain.export.description import ActInfo, ExportDescription, LayerSpec
from toolchain.export.ops import ActQDQ, BiasDQ, Fp16Weight, Hadamard, WeightDQ
from toolchain.balance.hadamard import _block, factorize, sylvester
from toolchain.balance.transform import OnlineBalance
from toolchain.errors import ExportError
from toolchain.quant.calibrate import quant_layers, set_submodule
from toolchain.quant.layers import QuantConv2d
from toolchain.topology import topology_of


def container_for(bits: int, symmetric: bool) -> tuple[str, torch.dtype, int, int, int]:
    """The unsigned ONNX container of a ``bits``-bit activation grid: (name, dtype, offset, min, max).

    A symmetric grid is shifted by ``offset`` (128 or 32768) so that it sits in the unsigned type
    exactly; unsigned containers are the ones whose default ORT kernels are exact on every x86 CPU
    (see toolchain/export/ops.py). Raises ValueError above 16 bits.
    """
    if bits <= 8:
        return "uint8", torch.uint8, (128 if symmetric else 0), 0, 255
    if bits <= 16:  # int32 in the traced graph (TorchScript cannot export uint16), retyped to UINT16 after export
        return "uint16", torch.int32, (32768 if symmetric else 0), 0, 65535
    raise ValueError(bits)


def hadamard_factors(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_m, H_p/√n) so that H_n·x = H_m · X · H_pᵀ over x reshaped to (m, p)."""
    m, p = factorize(n)
    hm = torch.tensor(_block(m) if m > 1 else np.ones((1, 1)), dtype=torch.float32)
    hp = torch.tensor(sylvester(p), dtype=torch.float32) / float(np.sqrt(n))
    return hm, hp


def ort_fusable(layer: nn.Module) -> str | None:
    """None if ``layer`` can be an ORT-fusable QDQ node unit (``--qdq-format ort``), else the reason why not.

    A node unit DQ(x) → Conv/MatMul ← DQ(w) → Q needs an 8-bit per-tensor activation grid (ORT's
    QLinearConv / QLinearMatMul take uint8 or int8 inputs, and a narrowing Clip between Q and DQ
    would break the unit) and a quantized weight (≤ 8 bits, held in int8)."""
    q, wq = layer.input_quantizer, layer.weight_quantizer
    if wq is None:
        return "float weight"
    if q is None:
        return "float input activation"
    if q.spec.per_channel:
        return "per-channel activation quantization"
    if q.spec.bits != 8:
        return f"{q.spec.bits}-bit input activations (QLinear ops take 8-bit grids; the narrower/wider grid stays in the exact form)"
    return None


OUTPUT_SAMPLES = 1 << 16  # op output values kept per layer and calibration input to fit the ort format's output grid


def output_grid(samples: torch.Tensor, lo: float, hi: float, ratios: tuple[float, ...] = tuple(1.0 - 0.05 * i for i in range(13))
                ) -> tuple[float, float, float]:
    """The uint8 output range [r·lo, r·hi] (r in ``ratios``) whose quantize-dequantize has the least squared
    error on ``samples`` (float32 1-D, values of the op output), with ``lo``/``hi`` the observed min/max.

    Returns (range lo, range hi, SQNR of that grid on the samples in dB). Clipping a few outliers buys a
    finer step for the bulk of the values; r = 1 (min/max) wins where the tails carry the error."""
    x = samples.double()
    power = float((x * x).mean()) or 1e-30
    best: tuple[float, float, float] | None = None
    for r in ratios:
        a, b = min(lo * r, 0.0), max(hi * r, 0.0)
        scale = (b - a) / 255.0 if b > a else 1.0
        zp = min(255.0, max(0.0, round(-a / scale)))
        q = (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale
        err = float(((q - x) ** 2).mean())
        if best is None or err < best[2]:
            best = (a, b, err)
    a, b, err = best
    return a, b, float(10 * np.log10(power / max(err, 1e-30)))


class ExportQuantLayer(nn.Module):
    """``flavour="qdq"``: explicit quantize/dequantize ops (ONNX, the ``exact`` format). ``flavour="float"``:
    a float graph with dequantized weights and a clamp to the designed activation range, which a TFLite
    quantizer turns into integer ops with exactly these ranges (TFLite backend). ``flavour="ort"``: the
    ``ort`` QDQ format — a node unit that ONNX Runtime's QDQ transformer (and QDQ-consuming NPU EPs) fuse
    into QLinearConv / QLinearMatMul / QGemm: DQ(uint8 input) → Conv/MatMul ← DQ(int8 weight, zero point
    0, per channel) [← DQ(int32 bias at s_x·s_w)] → Q(uint8 output) → DQ. The output grid is calibrated
    (``set_output_range``); until it is, the layer computes what the ``qdq`` flavour computes (and records
    its output range while ``output_range`` is not None). A layer that cannot form such a unit
    (``ort_fusable``) falls back to the ``qdq`` flavour and says why in ``describe()["ort_fallback"]``."""

    def __init__(self, name: str, layer: nn.Module, flavour: str = "qdq", int8_weights: bool = False):
        super().__init__()
        self.name = name
        self.int8_weights = int8_weights
        self.ort_fallback: str | None = None
        if flavour == "ort":
            self.ort_fallback = ort_fusable(layer)
            if self.ort_fallback is not None:
                flavour = "qdq"
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
        if self.flavour == "ort":
            self._init_ort_output()

    def _init_ort_output(self) -> None:
        """Int32 bias at s_x·s_w (rounding moves it by ≤ s_x·s_w/2, far below the output grid's step)
        and an uncalibrated uint8 output grid."""
        self.int_bias = self.bias is not None
        if self.int_bias:
            bias_scale = (self.act_scale * self.weight_scale).float()
            ratio = self.bias.detach().double() / bias_scale.double()
            if not torch.isfinite(ratio).all() or ratio.abs().max() >= 2**31 - 1:
                raise ExportError(f"layer {self.name}: its bias does not fit int32 at scale s_x*s_w (the ort QDQ format needs an "
                                  "int32 bias); export with --qdq-format exact")
            self.register_buffer("bias_int", torch.round(ratio).to(torch.int32))
            self.register_buffer("bias_scale", bias_scale)
            self.bias = None
        self.out_calibrated = False
        self.output_samples: list[torch.Tensor] = []  # values of the op output seen while calibrating (a random subset per input)
        self.register_buffer("out_scale", torch.tensor(1.0, dtype=torch.float32))
        self.register_buffer("out_zero_point", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("out_q_lo", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("out_q_hi", torch.tensor(255, dtype=torch.uint8))

    def set_output_range(self, lo: float, hi: float) -> None:
        """Fix the ``ort`` flavour's uint8 output grid to cover [lo, hi] ∪ {0} (asymmetric, 256 levels).

        Raises ValueError for a non-finite range or on another flavour."""
        if self.flavour != "ort":
            raise ValueError(f"layer {self.name}: only the ort flavour has an output grid")
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"layer {self.name}: output range [{lo}, {hi}] is not finite")
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        zp = int(min(255, max(0, round(-lo / scale))))
        self.out_scale.fill_(scale)
        self.out_zero_point.fill_(zp)
        self.out_calibrated = True

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
        name, dtype, offset, cmin, cmax = container_for(q.spec.bits, q.spec.symmetric)
        scale = float(q.scale.reshape(-1)[0])
        zp = int(round(float(q.zero_point.reshape(-1)[0])))
        if not (np.isfinite(scale) and scale > 0):
            raise ExportError(f"layer {self.name}: activation scale {scale} is not a positive finite number")
        clamp = q.spec.qmin + offset > cmin or q.spec.qmax + offset < cmax
        lo, hi = (q.spec.qmin - zp) * scale, (q.spec.qmax - zp) * scale
        self.act = ActInfo(q.spec.bits, q.spec.symmetric, scale, zp, name, offset, clamp, lo, hi)
        self.qmin, self.qmax = q.spec.qmin, q.spec.qmax
        if self.flavour == "float":
            return
        self.register_buffer("act_scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("act_zero_point", torch.tensor(zp + offset, dtype=dtype))
        if self.flavour == "ort":  # no narrowing Clip inside a node unit: the symmetric 8-bit grid also gets code −128
            self.act.clamp = False
            qmin, qmax = cmin - offset, cmax - offset
        else:
            qmin, qmax = q.spec.qmin, q.spec.qmax
        self.register_buffer("act_q_lo", torch.tensor(qmin + offset, dtype=dtype))
        self.register_buffer("act_q_hi", torch.tensor(qmax + offset, dtype=dtype))

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
        if self.flavour == "ort":
            # ≤ 7-bit designs: int8 container, zero point 0, the designed integers (a 4-bit grid: values in [-7, 7]).
            # 8-bit designs: uint8 container with zero point 128 (the same symmetric integers). Without VNNI, ORT's
            # u8 × s8 integer kernels add products in pairs into int16 (VPMADDUBSW), which saturates once
            # 2·255·|w| > 32767, i.e. for |w| > 64 — only 8-bit weights reach that (measured: an 8-bit int8 `ort`
            # export ran at 18 dB from itself under qemu's AVX2-only CPU); u8 × u8 kernels cannot saturate.
            # ``int8_weights`` (the ort-s8 format) keeps int8 for them: what NPU EPs want, and faster on VNNI/ARM.
            self.weight_3d = False
            self.weight_axis = 0 if self.is_conv else 1
            stored = w_int if self.is_conv else w_int.t().contiguous()
            if wq.bits >= 8 and not self.int8_weights:
                self.register_buffer("weight_int", (stored.to(torch.int16) + 128).to(torch.uint8))
                self.register_buffer("weight_zero_point", torch.full((w.shape[0],), 128, dtype=torch.uint8))
            else:
                self.register_buffer("weight_int", stored)
                self.register_buffer("weight_zero_point", torch.zeros(w.shape[0], dtype=torch.int8))
            self.register_buffer("weight_scale", scale.clone())
            return
        # ONNX layout: conv OIHW (channel axis 0); linear (in, out) so the DQ feeds MatMul directly (axis 1).
        # A linear layer whose input is not an ≤ 8-bit QDQ (16-bit or float activations) gets its weight as
        # (1, in, out), axis 2: on a 2-D DQ weight ORT's default session builds MatMulNBits with
        # accuracy_level 4, which re-quantizes the activations to int8 (0.5-0.8 % error measured on 16-bit
        # layers); with 8-bit activation QDQ the 2-D form is needed, since ORT fuses it into MatMulIntegerToFloat
        # (u8·u8, exact) and rejects the 3-D form's zero point there.
        self.weight_3d = not self.is_conv and (self.act is None or self.act.bits > 8)
        self.weight_axis = 0 if self.is_conv else (2 if self.weight_3d else 1)
        stored = w_int if self.is_conv else (w_int.t().contiguous()[None] if self.weight_3d else w_int.t().contiguous())
        if wq.bits <= 4:  # written as an INT4 initializer (toolchain/export/onnx_backend.py), no zero point
            self.register_buffer("weight_int", stored)
            self.weight_zero_point = None
        else:  # uint8 container, zero point 128: the symmetric grid exactly, and a u8·u8 product in ORT
            self.register_buffer("weight_int", (stored.to(torch.int16) + 128).to(torch.uint8))
            self.register_buffer("weight_zero_point", torch.full((w.shape[0],), 128, dtype=torch.uint8))
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

    @torch.no_grad()
    def absorb_output_transform(self, multiplier: torch.Tensor, shift: torch.Tensor | None) -> None:
        """Make this layer output (y − δ)·m instead of y (m > 0 per output channel), exactly: the weight
        integers stay, each output channel's weight scale becomes s_w·m and the bias (b − δ)·m."""
        if self.flavour != "float":
            raise ValueError("only the float flavour (dequantized weights) absorbs an output transform")
        m = multiplier.detach().float()
        self.weight_float.mul_(m.reshape(-1, *([1] * (self.weight_float.dim() - 1))))
        if getattr(self, "design_weight_scale", None) is not None:
            self.design_weight_scale = self.design_weight_scale * m
        bias = self.bias if self.bias is not None else torch.zeros_like(m)
        if shift is not None:
            bias = bias - shift.detach().float()
        self.bias = nn.Parameter(bias * m, requires_grad=False)

    def drop_transform(self) -> None:
        """Forget the online (x − δ)·m once the producer of x has absorbed it."""
        self.has_transform = False
        self.multiplier = None
        self.shift = None

    def describe(self) -> LayerSpec:
        """This layer's entry in the export description."""
        spec = LayerSpec(self.name, "conv2d" if self.is_conv else "linear", self.w_bits, self.has_transform, self.rotate,
                         getattr(self, "branch_rank", 0), act=copy.copy(self.act) if self.act is not None else None)
        if self.flavour in ("qdq", "ort"):
            spec.qdq_form = self.flavour if self.flavour == "ort" else "exact"
            spec.weight_container = (str(self.weight_int.dtype).split(".")[-1] if self.flavour == "ort"
                                     else "int4" if self.w_bits <= 4 else "uint8") if self.w_bits else None
            spec.ort_fallback = self.ort_fallback
        return spec

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
        if self.flavour == "ort":
            return self._ort_forward(x, branch_in)
        if self.act is not None:
            x = ActQDQ.apply(x, self.act_scale, self.act_zero_point, self.act_q_lo, self.act_q_hi, self.act.clamp)
        if self.w_bits is not None:
            w = WeightDQ.apply(self.weight_int, self.weight_scale, self.weight_zero_point, self.weight_axis)
        else:
            w = self.weight_float if self.is_conv else self.weight_float.t()
        # The float bias is a separate Add: on a Conv/MatMul whose inputs are DQ, ORT's default
        # WeightBiasQuantization would round it to int32 at s_x·s_w, coarse for 3–6-bit designs.
        if self.is_conv:
            y = F.conv2d(x, w, None, **self.conv_args)
        elif w.dim() == 3 and x.dim() == 2:  # (N, in) · (1, in, out): keep the product 2-D in the graph
            y = torch.matmul(x.unsqueeze(0), w).squeeze(0)
        else:
            y = torch.matmul(x, w)
        if self.bias is not None:
            y = y + (self.bias.reshape(1, -1, 1, 1) if self.is_conv else self.bias)
        return self._add_branch(y, branch_in, Fp16Weight.apply)

    def _ort_forward(self, x: torch.Tensor, branch_in: torch.Tensor) -> torch.Tensor:
        x = ActQDQ.apply(x, self.act_scale, self.act_zero_point, self.act_q_lo, self.act_q_hi, False)
        w = WeightDQ.apply(self.weight_int, self.weight_scale, self.weight_zero_point, self.weight_axis)
        b = BiasDQ.apply(self.bias_int, self.bias_scale) if self.int_bias else None
        if self.is_conv:
            y = F.conv2d(x, w, b, **self.conv_args)
        else:
            y = torch.matmul(x, w)
            if b is not None:
                y = y + b
        if self.output_range is not None:  # collecting the output grid's range (set only while calibrating)
            lo, hi = float(y.min()), float(y.max())
            self.output_range = (min(lo, self.output_range[0]), max(hi, self.output_range[1])) if self.output_range else (lo, hi)
            flat = y.detach().reshape(-1)
            gen = torch.Generator().manual_seed(len(self.output_samples))
            pick = torch.randperm(flat.numel(), generator=gen)[:OUTPUT_SAMPLES] if flat.numel() > OUTPUT_SAMPLES else slice(None)
            self.output_samples.append(flat[pick].clone())
        if self.out_calibrated:  # the requantization of the op output that makes the unit fusable
            y = ActQDQ.apply(y, self.out_scale, self.out_zero_point, self.out_q_lo, self.out_q_hi, False)
        return self._add_branch(y, branch_in, Fp16Weight.apply)

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


def fold_transforms_into_producers(module: nn.Module) -> dict[str, str]:
    """Fold a consumer's online (x − δ)·m into its producer where x is the producer's output alone
    (``Topology.producer_pairs``, e.g. VAE ``quant_conv`` ← ``encoder.conv_out``); returns consumer → producer.

    For the TFLite route: the converter folds a constant Sub/Mul that directly follows a conv into that
    conv's weights and bias, per output channel, so the weights in the graph stop matching the checkpoint's
    and the layer could not be quantized with its own scales. Done here instead, the fold is exact and
    explicit: x' = (W_p·x + b_p − δ)·m = (W_p·m)·x + (b_p − δ)·m with W_p = W_int·s_w, so the producer keeps
    its weight integers with per-channel scale s_w·m, its output *is* the consumer's designed input, and
    the runtime Sub/Mul disappear. Only positive, unrotated transforms fold (PassionSR's LET, an unrotated
    online balance) and only into a producer without a low-rank branch (whose output Add the converter
    cannot fold through anyway); anything else stays online."""
    layers = {n: m for n, m in module.named_modules() if isinstance(m, ExportQuantLayer)}
    folded: dict[str, str] = {}
    for consumer, producer in topology_of(module).producer_pairs:
        c, p = layers.get(consumer), layers.get(producer)
        if c is None or p is None or not c.has_transform or c.rotate or p.has_branch or c.is_conv != p.is_conv:
            continue
        m = c.multiplier
        if m.numel() != p.weight_float.shape[0] or not bool(torch.isfinite(m).all() and (m > 0).all()):
            continue
        p.absorb_output_transform(m, c.shift)
        c.drop_transform()
        folded[consumer] = producer
    return folded


class Float16Weight(nn.Module):
    """A float (not quantized) conv/linear whose weight is stored as float16 and cast to float32 at run time
    (ONNX: a float16 initializer → Cast); the bias stays float32. Computes ``layer`` with its weight
    rounded to float16 (round to nearest even), nothing else."""

    def __init__(self, layer: nn.Conv2d | nn.Linear):
        super().__init__()
        self.is_conv = isinstance(layer, nn.Conv2d)
        if self.is_conv:
            self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        self.register_buffer("weight16", layer.weight.detach().to(torch.float16))
        self.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False) if layer.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = Fp16Weight.apply(self.weight16)
        return F.conv2d(x, w, self.bias, **self.conv_args) if self.is_conv else F.linear(x, w, self.bias)


def float_layers(module: nn.Module) -> list[str]:
    """Names of the plain nn.Conv2d (zero padding) / nn.Linear layers of ``module`` outside its quantized
    (ExportQuantLayer) layers: the weights an export keeps in float."""
    inside = [n for n, m in module.named_modules() if isinstance(m, ExportQuantLayer)]
    return [n for n, m in module.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not any(n.startswith(q + ".") for q in inside)
            and getattr(m, "padding_mode", "zeros") == "zeros"]


def store_float_weights_fp16(module: nn.Module) -> list[str]:
    """Replace every float layer (``float_layers``) of an export-ready ``module`` by Float16Weight, in place;
    returns their names."""
    names = float_layers(module)
    for name in names:
        set_submodule(module, name, Float16Weight(module.get_submodule(name)))
    return names


@torch.no_grad()
def with_float16_weights(model: nn.Module, names: list[str]) -> nn.Module:
    """A deep copy of ``model`` with the weights of the layers ``names`` rounded to float16 and back: the PyTorch
    reference an export with float16 float weights is compared with."""
    ref = copy.deepcopy(model)
    for name in names:
        w = ref.get_submodule(name).weight
        w.copy_(w.to(torch.float16).float())
    return ref


def export_module(model: nn.Module, flavour: str = "qdq", int8_weights: bool = False) -> ExportDescription:
    """The shared folding step: a deep copy of ``model`` (float32, CPU, eval, no gradients) with every
    quantized layer replaced by an ExportQuantLayer of ``flavour`` (``qdq`` | ``ort`` | ``float``), the
    constant time path (and, for a constant-prompt model, the cross-attention k/v) folded; returns the
    ExportDescription (module + one LayerSpec per quantized layer). ``model`` is not modified.

    ``int8_weights`` (``ort`` flavour only): 8-bit weights in int8 with zero point 0 instead of uint8 + 128
    (the ``ort-s8`` QDQ format; see ExportQuantLayer._init_weight).

    The float flavour (TFLite) also folds online input transforms into linear producers
    (``fold_transforms_into_producers``); the QDQ flavours keep them, so each ONNX layer stays comparable
    with its PyTorch layer on its own. Raises ExportError naming the layer for anything no target can
    represent."""
    module = copy.deepcopy(model).cpu().float().eval()
    desc = ExportDescription(module, flavour)
    for name, layer in list(quant_layers(module)):
        layer_export = ExportQuantLayer(name, layer, flavour, int8_weights=int8_weights)
        set_submodule(module, name, layer_export)
        desc.layers[name] = layer_export.describe()
    if flavour == "float":
        for consumer, producer in fold_transforms_into_producers(module).items():
            desc.layers[consumer].transform = False
            desc.layers[consumer].transform_folded_into = producer
    fold_time_path(module)
    fold_prompt = getattr(module, "fold_constant_prompt", None)  # models with a constant prompt (osediff)
    if fold_prompt is not None:
        fold_prompt()
    for p in module.parameters():
        p.requires_grad_(False)
    return desc
