"""ONNX QDQ graph helpers used by the ONNX target (toolchain/export/onnx_backend.py)."""
