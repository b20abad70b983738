"""Fake quantization: quantizers, observers, quantized layers, configs and the quantize_ verb."""
