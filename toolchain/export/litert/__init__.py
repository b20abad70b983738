"""LiteRT (TFLite) steps used by the TFLite target (toolchain/export/tflite_backend.py), one job per module:
convert (float TFLite), locate (layers in the flatbuffer), recipe (ai-edge-quantizer ranges), weights
(checkpoint integers written back), audit (read-back), metadata, runtime."""
