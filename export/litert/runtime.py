"""Run a TFLite model in LiteRT's interpreter."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def tflite_runner(tflite: bytes, threads: int | None = None, xnnpack: bool = True) -> Callable[[tuple[torch.Tensor, ...]], np.ndarray]:
    """One LiteRT interpreter for ``tflite``, as a function: input tuple (float32 tensors) → the default
    signature's first output. ``xnnpack=True`` is the default interpreter (XNNPACK delegate applied, as in
    apps); ``False`` uses the built-in reference/optimized kernels only. Build it once and call it per
    input: creating the interpreter (parsing, XNNPACK weight packing) costs more than a run on large models."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    runner = Interpreter(model_content=tflite, num_threads=threads, experimental_op_resolver_type=resolver).get_signature_runner()

    def run(inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
        out = runner(**{f"args_{i}": t.numpy() for i, t in enumerate(inputs)})
        return next(iter(out.values()))

    return run


def run_tflite(tflite: bytes, inputs: tuple[torch.Tensor, ...], threads: int | None = None, xnnpack: bool = True) -> np.ndarray:
    """``tflite_runner(tflite, threads, xnnpack)(inputs)``: one run in a fresh interpreter."""
    return tflite_runner(tflite, threads, xnnpack)(inputs)
