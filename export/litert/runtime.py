"""Run a TFLite model in LiteRT's interpreter."""

from __future__ import annotations

import numpy as np
import torch


def run_tflite(tflite: bytes, inputs: tuple[torch.Tensor, ...], threads: int | None = None, xnnpack: bool = True) -> np.ndarray:
    """Run the default signature on ``inputs`` (float32 tensors) in LiteRT's interpreter and return
    the first output. ``xnnpack=True`` is the default interpreter (XNNPACK delegate applied, as in
    apps); ``False`` uses the built-in reference/optimized kernels only."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_content=tflite, num_threads=threads, experimental_op_resolver_type=resolver)
    runner = it.get_signature_runner()
    out = runner(**{f"args_{i}": t.numpy() for i, t in enumerate(inputs)})
    return next(iter(out.values()))
