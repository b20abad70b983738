"""The online Hadamard transform as ONNX local functions in the ``quantface`` domain.

Written with onnxscript so the op is a named node (``quantface.HadamardNCHW`` /
``quantface.HadamardLast``) that downstream compilers can recognise and fuse, while its body is
plain ONNX that ONNX Runtime executes:

    x (…, C) → reshape (…, m, p) → · H_pᵀ → H_m · → reshape (…, C)

i.e. the two-factor form H = H_m ⊗ H_p with C·(m + p) MACs per position instead of C² (the
1/√C normalisation is folded into H_p). The two factors are passed as inputs (shared
initializers, one pair per channel count), so one function body serves every order.
"""

from __future__ import annotations

from onnxscript import opset21 as op
from onnxscript import script
from onnxscript.values import Opset

DOMAIN = "quantface"
quantface = Opset(DOMAIN, 1)


@script(quantface, default_opset=op)
def HadamardNCHW(x, hm, hp):
    """Hadamard over the channel axis of an NCHW tensor."""
    xt = op.Transpose(x, perm=[0, 2, 3, 1])
    shape = op.Shape(xt)
    lead = op.Shape(xt, start=0, end=3)
    m = op.Shape(hm, start=0, end=1)
    p = op.Shape(hp, start=0, end=1)
    y = op.Reshape(xt, op.Concat(lead, m, p, axis=0))
    y = op.MatMul(y, op.Transpose(hp, perm=[1, 0]))
    y = op.MatMul(hm, y)
    y = op.Reshape(y, shape)
    return op.Transpose(y, perm=[0, 3, 1, 2])


@script(quantface, default_opset=op)
def HadamardLast(x, hm, hp):
    """Hadamard over the last axis (token × channel activations of linear layers)."""
    shape = op.Shape(x)
    lead = op.Shape(x, start=0, end=-1)
    m = op.Shape(hm, start=0, end=1)
    p = op.Shape(hp, start=0, end=1)
    y = op.Reshape(x, op.Concat(lead, m, p, axis=0))
    y = op.MatMul(y, op.Transpose(hp, perm=[1, 0]))
    y = op.MatMul(hm, y)
    return op.Reshape(y, shape)


FUNCTIONS = {"HadamardNCHW": HadamardNCHW, "HadamardLast": HadamardLast}


def function_protos(used: set[str]):
    return [FUNCTIONS[name].to_function_proto() for name in sorted(used)]
