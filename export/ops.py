"""Export-visible operations: PyTorch autograd Functions whose ``symbolic`` emits the ONNX ops.

Their ``forward`` computes exactly what the fake-quant model computes, so the export module is a
faithful, traceable copy; their ``symbolic`` (TorchScript exporter) writes:

* ``ActQDQ``      → [Clip(lo, hi)] → QuantizeLinear → DequantizeLinear (per tensor; the Clip narrows
                    an int8/uint8/int16 container to the designed 3–6-bit range so results are exact)
* ``WeightDQ``    → DequantizeLinear(integer weight initializer, per-channel scale, axis 0)
* ``Fp16Weight``  → Cast(float16 initializer → float): low-rank branches stored in 16 bit
* ``Hadamard``    → quantface.HadamardNCHW / quantface.HadamardLast (local functions, see hadamard_onnx)
"""

from __future__ import annotations

import torch


class ActQDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, lo, hi, qmin: int, qmax: int, clip: bool):
        q = torch.clamp(torch.round(x / scale) + zero_point.to(x.dtype), qmin, qmax)
        return (q - zero_point.to(x.dtype)) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, lo, hi, qmin, qmax, clip):
        if clip:
            x = g.op("Clip", x, lo, hi)
        q = g.op("QuantizeLinear", x, scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point)


class WeightDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w_int, scale):
        return w_int.to(scale.dtype) * scale.reshape(-1, *([1] * (w_int.dim() - 1)))

    @staticmethod
    def symbolic(g, w_int, scale):
        return g.op("DequantizeLinear", w_int, scale, axis_i=0)


class Fp16Weight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w16):
        return w16.float()

    @staticmethod
    def symbolic(g, w16):
        return g.op("Cast", w16, to_i=1)  # TensorProto.FLOAT


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
