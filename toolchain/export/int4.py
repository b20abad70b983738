"""Signed 4-bit packing shared by both targets: two values per byte, the first in the low nibble
(ONNX's INT4 tensor layout and TFLite's INT4 buffer layout are the same)."""

from __future__ import annotations

import numpy as np


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Integers in [-8, 7] (any shape, flattened in C order) → uint8 array of ⌈n/2⌉ bytes.

    Raises ValueError for values outside the int4 range."""
    v = np.asarray(values).astype(np.int64).ravel()
    if v.size and (v.min() < -8 or v.max() > 7):
        raise ValueError(f"values outside the int4 range [-8, 7] (min {v.min()}, max {v.max()})")
    v = v.astype(np.int8)
    if v.size % 2:
        v = np.concatenate([v, np.zeros(1, np.int8)])
    return ((v[0::2].astype(np.uint8) & 0x0F) | ((v[1::2].astype(np.uint8) & 0x0F) << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` signed 4-bit values of a packed uint8 buffer, as int8."""
    b = np.asarray(packed).astype(np.uint8).ravel()
    out = np.empty(b.size * 2, np.int8)
    out[0::2], out[1::2] = (b & 0x0F).astype(np.int8), (b >> 4).astype(np.int8)
    out[out > 7] -= 16
    return out[:count]
