"""Run a TFLite model in LiteRT's interpreter."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from toolchain.errors import InputError


def _dims(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def default_signature(signatures: dict[str, Any]) -> str | None:
    """The signature a caller gets without naming one: ``restore`` in a pipeline file, else the only one (None: none)."""
    from toolchain.export.pipeline import RESTORE

    if RESTORE in signatures:
        return RESTORE
    return next(iter(signatures)) if len(signatures) == 1 else None


def input_order(signature: str, names: list[str]) -> list[str]:
    """The signature's input names in call order: a pipeline signature's ``STAGE_IO`` order (toolchain/export/pipeline.py), or
    litert-torch's positional ``args_0``, ``args_1``, … of a single-part export."""
    from toolchain.export.pipeline import STAGE_IO

    if signature in STAGE_IO:
        wanted = [n for n in STAGE_IO[signature][1] if n in names]
        if sorted(wanted) == sorted(names):
            return wanted
    return sorted(names, key=lambda n: (len(n), n))


def check_shape(model: str, signature: str, name: str, baked, given) -> None:
    """Raise InputError (one line) when ``given`` differs from the ``baked`` input shape of a fixed-size TFLite graph.

    LiteRT would resize the input and then fail inside XNNPACK ("failed to reshape") or compute with shape constants
    the converter baked in (attention reshapes, skip concatenations): measured on the tiny preset at 2x3x48x48 and
    at batch 2 of the exported 32 px. So a TFLite export runs at its export shape only."""
    if [int(d) for d in given] != [int(d) for d in baked]:
        raise InputError(f"{model}: input '{name}' of signature '{signature}' has the fixed shape {_dims(baked)} baked in at export; "
                         f"got {_dims(given)} (LiteRT cannot resize this graph: resize or tile the image to {_dims(baked)} and "
                         "run one image per call, as the Android demo does, or use an ONNX export with --dynamic for other sizes)")


def tflite_runner(tflite: bytes, threads: int | None = None, xnnpack: bool = True, signature: str | None = None,
                  name: str = "model") -> Callable[[tuple[torch.Tensor, ...]], np.ndarray]:
    """One LiteRT interpreter for ``tflite``, as a function: input tuple (float32 tensors, in the signature's input
    order: ``STAGE_IO`` for a pipeline signature, else args_0, args_1, …) → the signature's (first) output as a
    float32 numpy array. ``signature``: which signature of a multi-signature file (default: ``restore`` when
    present, else the only one). ``xnnpack=True`` is the default interpreter (XNNPACK delegate applied, as in apps);
    ``False`` uses the built-in reference/optimized kernels only. Build it once and call it per input: creating
    the interpreter (parsing, XNNPACK weight packing) costs more than a run on large models.

    Raises InputError for an unknown signature, and at call time for an input whose shape is not the one the graph
    was exported at (``check_shape``; ``name`` is the file name used in that message)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_content=tflite, num_threads=threads, experimental_op_resolver_type=resolver)
    signatures = it.get_signature_list()
    key = signature if signature is not None else default_signature(signatures)
    if key not in signatures:
        raise InputError(f"{name}: no signature '{signature}' (it has {', '.join(signatures) or 'none'})")
    runner = it.get_signature_runner(key)
    details = runner.get_input_details()
    order = input_order(key, list(details))
    outputs = signatures[key]["outputs"]

    def run(inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
        if len(inputs) != len(order):
            raise InputError(f"{name}: signature '{key}' takes {len(order)} input(s) ({', '.join(order)}), got {len(inputs)}")
        for n, t in zip(order, inputs):
            check_shape(name, key, n, details[n]["shape"], t.shape)
        out = runner(**{n: t.numpy() for n, t in zip(order, inputs)})
        return out[outputs[0]] if outputs and outputs[0] in out else next(iter(out.values()))

    return run


def run_tflite(tflite: bytes, inputs: tuple[torch.Tensor, ...], threads: int | None = None, xnnpack: bool = True,
               signature: str | None = None) -> np.ndarray:
    """``tflite_runner(tflite, threads, xnnpack, signature)(inputs)``: one run in a fresh interpreter."""
    return tflite_runner(tflite, threads, xnnpack, signature)(inputs)
