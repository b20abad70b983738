"""The export seam: the options every target takes, the interface each target implements, and the
registry the CLI dispatches through (NNCF-style: one shared folding step, toolchain/export/prepare.py, then one
small module per target — toolchain/export/onnx_backend.py, toolchain/export/tflite_backend.py).

    backend = get_backend("tflite")
    report = backend.export(model, Path("m.tflite"), ExportOptions(part="full", calib_inputs=samples))
    report["validation"] = backend.validate(Path("m.tflite"), model, options, samples)
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from toolchain.export.parts import PARTS
from toolchain.errors import ExportError

QDQ_FORMATS = ("exact", "ort", "ort-s8")
WEIGHT_CONTAINERS = ("auto", "int8")
PRECISIONS = ("int", "fp16")
FLOAT_WEIGHTS = ("auto", "fp32", "fp16")
Inputs = list[tuple[torch.Tensor, ...]]


@dataclass
class ExportOptions:
    """What an export is asked for; ``check(target)`` refuses options that do not apply to the target.

    part: one of PARTS (``full`` = LQ image → restored image); dynamic: dynamic batch and spatial size
    (ONNX); opset: ONNX opset; qdq_format: ONNX QDQ form (QDQ_FORMATS; None = ``exact``); weight_container:
    TFLite weight storage (WEIGHT_CONTAINERS); precision: TFLite ``int`` (integer ops with the checkpoint's
    grids; float32 for a float model) or ``fp16`` (float16 weights, float activations: LiteRT's GPU delegate
    runs it in fp16; a checkpoint keeps its designed weight grid, activations are not quantized); calib_inputs: input tuples of the part (float32, images
    in [-1, 1]) for the op-output ranges (TFLite, ONNX ``ort``); mp_table: a mixed-precision table to
    annotate with executed containers (TFLite); float_weights: ONNX storage of the conv/linear weights that are
    not quantized (the embedder of a QuantFace checkpoint): ``fp16``, ``fp32``, or ``auto`` = fp16 in a
    quantized export and fp32 in a float model's export; meta: checkpoint metadata carried into the report."""

    part: str = "full"
    dynamic: bool = False
    opset: int = 21
    qdq_format: str | None = None
    weight_container: str = "auto"
    precision: str = "int"
    float_weights: str = "auto"
    calib_inputs: Inputs | None = None
    mp_table: str | os.PathLike | None = None
    meta: dict[str, Any] | None = None

    def check(self, target: str) -> None:
        """Raise ExportError for a value outside its choices or an option the target does not take."""
        if self.part not in PARTS:
            raise ExportError(f"unknown part '{self.part}' (choose from {', '.join(PARTS)})")
        if self.qdq_format is not None and self.qdq_format not in QDQ_FORMATS:
            raise ExportError(f"unknown QDQ format '{self.qdq_format}' (choose from {', '.join(QDQ_FORMATS)})")
        if self.weight_container not in WEIGHT_CONTAINERS:
            raise ExportError(f"unknown weight container '{self.weight_container}' (choose from {', '.join(WEIGHT_CONTAINERS)})")
        if target != "onnx" and self.qdq_format is not None:
            raise ExportError("--qdq-format applies to --target onnx only")
        if self.precision not in PRECISIONS:
            raise ExportError(f"unknown precision '{self.precision}' (choose from {', '.join(PRECISIONS)})")
        if self.precision != "int" and target != "tflite":
            raise ExportError("--precision fp16 applies to --target tflite only (ONNX: --float-weights fp16 stores float weights in float16)")
        if self.precision != "int" and (self.weight_container != "auto" or self.mp_table is not None):
            raise ExportError("--precision fp16 takes no --weight-container or --mp-table (its weights are float16, its activations float)")
        if self.float_weights not in FLOAT_WEIGHTS:
            raise ExportError(f"unknown float-weight storage '{self.float_weights}' (choose from {', '.join(FLOAT_WEIGHTS)})")
        if target != "onnx" and self.float_weights != "auto":
            raise ExportError("--float-weights applies to --target onnx only (TFLite: --precision fp16)")
        if target != "onnx" and self.dynamic:
            raise ExportError("--dynamic applies to --target onnx only (a TFLite export has the input size of the model it "
                              "was exported from)")
        if target != "tflite" and self.weight_container != "auto":
            raise ExportError("--weight-container applies to --target tflite only")
        if target != "tflite" and self.mp_table is not None:
            raise ExportError("--mp-table applies to --target tflite only")


class ExportBackend(Protocol):
    """One export target. ``export`` writes ``out`` (and the target's side files beside it, atomically)
    and returns a JSON-serialisable report; ``validate`` runs the written file on ``inputs`` and compares
    it with ``model`` (toolchain/export/validate.py: validate_runs)."""

    target: str
    suffix: str

    def export(self, model: torch.nn.Module, out: Path, options: ExportOptions) -> dict[str, Any]: ...

    def validate(self, path: Path, model: torch.nn.Module, options: ExportOptions, inputs: Inputs) -> dict[str, Any]: ...


# target → "module:class"; imported on first use so that choosing a target loads only its runtime
BACKENDS = {"onnx": "toolchain.export.onnx_backend:OnnxBackend", "tflite": "toolchain.export.tflite_backend:TfliteBackend"}


def get_backend(target: str) -> ExportBackend:
    """The backend registered for ``target``. Raises ExportError for an unknown target."""
    if target not in BACKENDS:
        raise ExportError(f"unknown export target '{target}' (choose from {', '.join(BACKENDS)})")
    module, cls = BACKENDS[target].split(":")
    return getattr(importlib.import_module(module), cls)()
