"""Latency profiling: host runs (LiteRT interpreter, ONNX Runtime) and phones (adb + benchmark_model)."""
