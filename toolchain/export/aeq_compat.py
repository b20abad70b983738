"""Work-arounds for ai-edge-quantizer (pinned 0.10.*) needed at SD-2.1 size.

``uniform_quantize`` takes a chunked path for tensors over 32 MiB that flattens the data to
``[-1, last_dim]`` but keeps per-channel scales at the tensor's rank, so ``np.broadcast_to`` fails
for every 4-D conv weight over 32 MiB ("input operand has more dimensions than allowed by the axis
remapping"; the osdface UNet has dozens). Inside :func:`large_conv_weights_fixed` such tensors are
quantized as ``[channels, -1]`` matrices, which is the same per-channel (axis 0) arithmetic.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np

_CHUNKED_ABOVE = 32 * 1024 * 1024


def _needs_matrix_view(tensor: np.ndarray, params, blockwise: bool) -> bool:
    scale = np.asarray(params.scale)
    return (not blockwise and tensor.ndim > 2 and tensor.nbytes > _CHUNKED_ABOVE
            and params.quantized_dimension in (0, None) and scale.size in (1, tensor.shape[0]))


@contextlib.contextmanager
def large_conv_weights_fixed() -> Iterator[None]:
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt

    original = uqt.uniform_quantize

    def uniform_quantize(tensor_data, quantization_params, is_blockwise_quant=False):
        if not _needs_matrix_view(tensor_data, quantization_params, is_blockwise_quant):
            return original(tensor_data, quantization_params, is_blockwise_quant)
        matrix = tensor_data.reshape(tensor_data.shape[0], -1)
        params = dataclasses.replace(quantization_params, scale=np.asarray(quantization_params.scale).reshape(-1),
                                     zero_point=np.asarray(quantization_params.zero_point).reshape(-1))
        return original(matrix, params, False).reshape(tensor_data.shape)

    uqt.uniform_quantize = uniform_quantize
    try:
        yield
    finally:
        uqt.uniform_quantize = original
