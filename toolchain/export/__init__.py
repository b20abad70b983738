"""Exporters: a shared folding step and one backend per target (ONNX QDQ, TFLite)."""
