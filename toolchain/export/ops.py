"""Export-visible operations: PyTorch autograd Functions whose ``symbolic`` emits the ONNX ops.

Their ``forward`` computes exactly what the fake-quant model computes, so the export module is a
faithful, traceable copy; their ``symbolic`` (TorchScript exporter) writes:

* ``ActQDQ``      → QuantizeLinear(uint8 | uint16) → [Clip(q_lo, q_hi) on the *integers*] → DequantizeLinear
                    (per tensor). Activations always travel in an unsigned container: a symmetric
                    grid q ∈ [−2^(b−1), 2^(b−1)−1] is stored as q + 128 (zero point 128), which holds
                    it exactly. The integer Clip narrows the container to a designed 3–7-bit range;
                    placed between Q and DQ it is exact and no float fusion can move it onto another
                    consumer of the producing op (ORT's Conv(+Add)+Clip fusions did, before).
* ``WeightDQ``    → DequantizeLinear(integer weight initializer, per-channel scale, zero point, axis):
                    INT4 initializers for ≤ 4-bit weights (float kernels: no runtime has a saturating
                    int4 path), uint8 with zero point 128 for 5–8-bit weights. uint8 × uint8 is the
                    one 8-bit product whose x86 kernels cannot saturate: u8 × s8 runs through
                    VPMADDUBSW (16-bit pair sums) on CPUs without VNNI, which ONNX Runtime picks by
                    default for QDQ MatMul → MatMulIntegerToFloat, and lost 21–44 % of the output
                    range on attention projections of the tiny model (AVX2 EPYC).
* ``BiasDQ``      → DequantizeLinear(int32 bias initializer, per-channel scale s_x·s_w, axis 0): the bias
                    input of an ORT-fusable node unit (``--qdq-format ort``, toolchain/export/prepare.py)
* ``Fp16Weight``  → Cast(float16 initializer → float): low-rank branches stored in 16 bit
* ``Hadamard``    → quantface.HadamardNCHW / quantface.HadamardLast (local functions, see hadamard_onnx)
"""

from __future__ import annotations

import torch


class ActQDQ(torch.autograd.Function):
    """Fake quantization in the container's integer domain.

    Args: x float (any shape); scale float32 scalar (> 0); zero_point, q_lo, q_hi scalars of the
    container dtype (torch.uint8 or torch.uint16: the designed zero point / grid bounds shifted into
    the container); clip: whether [q_lo, q_hi] is narrower than the container.
    Returns ``(clamp(round(x / scale) + zero_point, q_lo, q_hi) − zero_point) · scale`` — identical to
    the checkpoint's FakeQuantizer, since the shift by the container offset is exact in float.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, q_lo, q_hi, clip: bool):
        zp = zero_point.to(x.dtype)
        q = torch.clamp(torch.round(x / scale) + zp, q_lo.to(x.dtype), q_hi.to(x.dtype))
        return (q - zp) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, q_lo, q_hi, clip):
        q = g.op("QuantizeLinear", x, scale, zero_point)
        if clip:
            q = g.op("Clip", q, q_lo, q_hi)
        return g.op("DequantizeLinear", q, scale, zero_point)


class WeightDQ(torch.autograd.Function):
    """``(w_stored − zero_point) · scale`` per channel along ``axis``.

    Args: w_stored int8 (≤ 4-bit designs, written as INT4) or uint8 (design + 128); scale float32
    (channels,); zero_point None or uint8 (channels,) all 128; axis: the output-channel axis
    (0 for conv OIHW, 1 for the (in, out) linear weight that feeds MatMul directly).
    """

    @staticmethod
    def forward(ctx, w_stored, scale, zero_point, axis: int):
        shape = [1] * w_stored.dim()
        shape[axis] = -1
        w = w_stored.to(scale.dtype)
        if zero_point is not None:
            w = w - zero_point.to(scale.dtype).reshape(shape)
        return w * scale.reshape(shape)

    @staticmethod
    def symbolic(g, w_stored, scale, zero_point, axis):
        if zero_point is None or zero_point.node().mustBeNone():
            return g.op("DequantizeLinear", w_stored, scale, axis_i=axis)
        return g.op("DequantizeLinear", w_stored, scale, zero_point, axis_i=axis)


class BiasDQ(torch.autograd.Function):
    """``b_int · scale``: an int32 bias at the product scale of its layer's input and weight.

    Args: b_int int32 (channels,); scale float32 (channels,) = s_x · s_w (zero point 0, ONNX's
    default for int32). Returns float32 (channels,). Emitted only by the ``ort`` QDQ format, where
    a runtime's fused QLinearConv / QGemm adds it inside the int32 accumulator.
    """

    @staticmethod
    def forward(ctx, b_int, scale):
        return b_int.to(scale.dtype) * scale

    @staticmethod
    def symbolic(g, b_int, scale):
        return g.op("DequantizeLinear", b_int, scale, axis_i=0)


class Fp16Weight(torch.autograd.Function):
    """A float16 weight used in float32. Traced as a placeholder ``quantface::Float16Weight`` node, which the
    exporter's constant folding leaves alone (a plain Cast of an initializer would be folded into a float32
    constant, doubling the file); toolchain/export/qdq/graph.py ``finalize`` turns it into ``Cast(to=FLOAT)``."""

    @staticmethod
    def forward(ctx, w16):
        return w16.float()

    @staticmethod
    def symbolic(g, w16):
        out = g.op("quantface::Float16Weight", w16)
        out.setType(w16.type().with_dtype(torch.float32))
        return out


class Hadamard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, hm, hp, nchw: bool):
        # the function body: x (…, C) → (…, m, p) → ·H_pᵀ → H_m· → (…, C)
        xt = x.movedim(1, -1) if nchw else x
        lead = xt.shape[:-1]
        y = torch.matmul(hm, torch.matmul(xt.reshape(*lead, hm.shape[0], hp.shape[0]), hp.t())).reshape(xt.shape)
        return y.movedim(-1, 1) if nchw else y

    @staticmethod
    def symbolic(g, x, hm, hp, nchw):
        out = g.op("quantface::HadamardNCHW" if nchw else "quantface::HadamardLast", x, hm, hp)
        out.setType(x.type())
        return out
