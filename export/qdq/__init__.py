"""ONNX QDQ graph helpers used by the ONNX target (export/onnx_backend.py)."""
