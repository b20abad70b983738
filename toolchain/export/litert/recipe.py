"""The ai-edge-quantizer recipe with the checkpoint's own ranges: containers per layer, designed input
ranges, op output ranges from the PyTorch float flavour."""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any

import numpy as np
import torch

from toolchain.export.aeq_compat import large_conv_weights_fixed
from toolchain.export.backend import WEIGHT_CONTAINERS
from toolchain.export.description import ActInfo, LayerSpec
from toolchain.export.litert.locate import match_layers
from toolchain.export.litert.weights import write_checkpoint_weights
from toolchain.errors import ExportError


def _container(bits: int) -> int:
    if bits <= 8:
        return 8
    if bits <= 16:
        return 16
    raise ExportError(f"{bits}-bit activations have no TFLite container")


def _designed_range(act: ActInfo, container_bits: int) -> tuple[float, float]:
    """Range to hand the quantizer so its int8/int16 scale equals the designed scale."""
    s, lo = act.scale, act.lo
    if container_bits == 8:
        return lo, lo + 255.0 * s
    bound = max(abs(act.lo), abs(act.hi))  # int16 is symmetric in TFLite: nearest representable design
    return -bound, bound


def _weight_container(w_bits: int, policy: str) -> int:
    """``auto``: int4 storage for ≤ 4-bit weights (smallest file); ``int8``: every weight in int8 (the 4-bit grid kept
    exactly), which CPU runtimes such as XNNPACK run on their fast int8 path."""
    if policy not in WEIGHT_CONTAINERS:
        raise ExportError(f"unknown weight container '{policy}' (choose from {', '.join(WEIGHT_CONTAINERS)})")
    return 4 if w_bits <= 4 and policy == "auto" else 8


# TFLite ActivationFunctionType → the interval its fused activation maps outputs into
_FUSED_CLIP = {0: (-np.inf, np.inf), 1: (0.0, np.inf), 2: (-1.0, 1.0), 3: (0.0, 6.0)}


def _after_fused_activation(rng: list[float], fused: int, name: str) -> tuple[float, float]:
    if fused not in _FUSED_CLIP:
        raise ExportError(f"layer {name}: the converter fused activation type {fused} into its op; its output range is unknown")
    lo, hi = _FUSED_CLIP[fused]
    return float(np.clip(rng[0], lo, hi)), float(np.clip(rng[1], lo, hi))


def output_ranges(module: torch.nn.Module, wrapped: torch.nn.Module, calib_inputs: list[tuple[torch.Tensor, ...]],
                  names: list[str]) -> dict[str, tuple[float, float]]:
    """Range of each quantized conv/linear's own output (before any low-rank branch is added) over the calibration
    inputs, from the PyTorch float flavour: the same values the float TFLite computes, without running a TFLite
    calibration interpreter that keeps every intermediate tensor (> 24 GB at 512 px)."""
    layers = {n: module.get_submodule(n) for n in names}
    for layer in layers.values():
        layer.output_range = ()
    try:
        with torch.no_grad():
            for inp in calib_inputs:
                wrapped(*inp)
        missing = [n for n, layer in layers.items() if not layer.output_range]
        if missing:
            raise ExportError(f"layers {missing[:3]} did not run on the calibration inputs; their output ranges are unknown")
        return {n: layer.output_range for n, layer in layers.items()}
    finally:
        for layer in layers.values():
            layer.output_range = None


class _SharedBufferNote(logging.Filter):
    """Drops ai-edge-quantizer's "is overriding other previously quantized data in buffer" warning: in a pipeline file
    every weight shared by two signatures is quantized once per signature with the same recipe (the same data), and
    write_checkpoint_weights then writes the checkpoint's integers into that one buffer anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "overriding other previously quantized data" not in record.getMessage()


@contextlib.contextmanager
def _shared_buffer_notes_silenced():
    note = _SharedBufferNote()
    logging.getLogger().addFilter(note)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(note)


def quantize_with_checkpoint_ranges(float_bytes: bytes, module: torch.nn.Module, wrapped: torch.nn.Module,
                                    layers: dict[str, LayerSpec], calib_inputs: list[tuple[torch.Tensor, ...]],
                                    constant: set[str] | list[set[str]], weight_container: str = "auto",
                                    subgraph_layers: list[set[str]] | None = None) -> tuple[bytes, dict[str, Any]]:
    """The integer TFLite: an exact-scope ai-edge-quantizer recipe per quantized layer found in ``float_bytes``
    (input range = the checkpoint's designed grid, output range from the PyTorch float flavour on
    ``calib_inputs`` run through ``wrapped``), then the checkpoint's own weight integers and scales written back.
    Returns (bytes, plan: layer → op tensors, containers and the converter's folded factor, and ``sites``: the
    layer's op in each subgraph).

    A multi-signature file: ``subgraph_layers`` = per subgraph the layers its signature runs, ``constant`` = per
    subgraph those folded to constants; ``wrapped`` must run every layer (the whole pipeline), so each layer gets
    one output range, shared by its ops in all signatures."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer import quantizer as aeq

    if subgraph_layers is None:  # one subgraph: every layer of ``layers``
        subgraph_layers = [set(layers)]
        constant = [set(constant)]
    ops = match_layers(float_bytes, module, [[n for n, s in layers.items() if s.quantized and n in names] for names in subgraph_layers],
                       list(constant))
    q = aeq.Quantizer(bytearray(float_bytes))
    plan: dict[str, dict[str, Any]] = {}
    for name in ops:
        spec, op = layers[name], ops[name]
        a_cont = _container(spec.act.bits)
        if spec.w_bits > 8:
            raise ExportError(f"layer {name}: {spec.w_bits}-bit weights are not supported by TFLite kernels")
        w_cont = _weight_container(spec.w_bits, weight_container)
        # an op's scope is its output tensor names joined with ";" plus a trailing ";"
        for site in op["sites"]:  # one op per subgraph that runs the layer (signatures of a pipeline file): the same recipe
            q.add_static_config(f"^{re.escape(site['output'])};$", getattr(qtyping.TFLOperationName, site["op"]), a_cont, w_cont)
        plan[name] = {**op, "a_container": a_cont, "w_container": w_cont}
    outputs = output_ranges(module, wrapped, calib_inputs, list(plan))
    calib: dict[str, dict[str, np.ndarray]] = {}
    for name, p in plan.items():
        lo, hi = _designed_range(layers[name].act, p["a_container"])
        for site in p["sites"]:  # every signature's op of the layer gets the same designed input range and output range
            calib[site["input"]] = {"min": np.array([lo], np.float32), "max": np.array([hi], np.float32)}
            # the converter folds a positive factor into some weights (and biases): the op's output is scaled alike
            out_lo, out_hi = _after_fused_activation([v * site["factor"] for v in outputs[name]], site["fused_activation"], name)
            calib[site["output"]] = {"min": np.array([out_lo], np.float32), "max": np.array([out_hi], np.float32)}
    with large_conv_weights_fixed(), _shared_buffer_notes_silenced():
        result = q.quantize(calib, enable_progress_report=False)
    return write_checkpoint_weights(bytes(result.quantized_model), plan, module), plan


def float16_weights(float_bytes: bytes) -> bytes:
    """The float TFLite with every supported op's weights stored as float16 (DEQUANTIZE to float32 in front of
    the op; ai-edge-quantizer's FLOAT_CASTING, weight-only, 16 bits): half the size, and what LiteRT's GPU
    delegate runs in fp16. Activations stay float."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer import quantizer as aeq
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    q = aeq.Quantizer(bytearray(float_bytes))
    q.add_weight_only_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, 16, algorithm_key=AlgorithmName.FLOAT_CASTING)
    return bytes(q.quantize().quantized_model)
