"""The ai-edge-quantizer work-around quantizes > 32 MiB conv weights exactly as small ones are."""

import numpy as np


def test_large_conv_weight_quantizes_like_its_slices():
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt

    from toolchain.export.aeq_compat import large_conv_weights_fixed

    rng = np.random.default_rng(0)
    w = rng.standard_normal((1024, 3, 3, 1024), dtype=np.float32)  # 37.7 MB, OHWI like a TFLite conv weight
    scale = (np.abs(w).reshape(1024, -1).max(1) / 127).astype(np.float32)
    params = qtyping.UniformQuantParams(num_bits=8, quantized_dimension=0, scale=scale, zero_point=np.zeros(1024, np.int32), symmetric=True)
    with large_conv_weights_fixed():
        big = uqt.uniform_quantize(w, params)
    assert uqt.uniform_quantize is not None and big.shape == w.shape and big.dtype == np.int8
    for lo in range(0, 1024, 256):  # each slice is under the 32 MiB chunking threshold: upstream's plain path
        part = qtyping.UniformQuantParams(num_bits=8, quantized_dimension=0, scale=scale[lo:lo + 256],
                                          zero_point=np.zeros(256, np.int32), symmetric=True)
        assert np.array_equal(big[lo:lo + 256], uqt.uniform_quantize(w[lo:lo + 256], part))
    expected = np.clip(np.round(w / scale[:, None, None, None]), -127, 127)
    assert np.array_equal(big, expected)
