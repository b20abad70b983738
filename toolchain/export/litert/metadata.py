"""Named JSON metadata buffers inside a TFLite flatbuffer (the executed precision table travels in the file)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

METADATA_KEY = "quantface_precision"


def add_metadata(tflite: bytes, key: str, payload: dict[str, Any]) -> bytes:
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model_from_bytearray(bytearray(tflite))
    buf = schema.BufferT()
    buf.data = np.frombuffer(json.dumps(payload).encode(), dtype=np.uint8)
    model.buffers.append(buf)
    meta = schema.MetadataT()
    meta.name = key
    meta.buffer = len(model.buffers) - 1
    model.metadata = (model.metadata or []) + [meta]
    return bytes(fbu.convert_object_to_bytearray(model))


def read_metadata(tflite: bytes, key: str = METADATA_KEY) -> dict[str, Any] | None:
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model_from_bytearray(bytearray(tflite))
    for m in model.metadata or []:
        name = m.name.decode() if isinstance(m.name, bytes) else m.name
        if name == key:
            return json.loads(bytes(model.buffers[m.buffer].data).decode())
    return None
