"""The neutral export description: what the shared folding step (toolchain/export/prepare.py) hands every target.

``export_module`` turns a quantized checkpoint into an export-ready PyTorch module plus one typed
``LayerSpec`` per quantized layer; the ONNX and TFLite targets read these (never dicts of strings) and
write them into their reports with ``LayerSpec.to_dict()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn


@dataclass
class ActInfo:
    """A layer's input activation grid as designed in the checkpoint.

    ``bits`` 2–16; ``scale`` > 0 (float units per step) and integer ``zero_point`` of the designed grid;
    ``container``: the unsigned ONNX container (``uint8`` | ``uint16``) the grid sits in, shifted by
    ``container_offset`` (128 / 32768 for symmetric grids, else 0); ``clamp``: the designed grid is
    narrower than its container (3–6 bits), so exporters clip to it; [``lo``, ``hi``]: the float range of
    the designed grid."""

    bits: int
    symmetric: bool
    scale: float
    zero_point: int
    container: str
    container_offset: int
    clamp: bool
    lo: float
    hi: float


@dataclass
class LayerSpec:
    """One quantized conv/linear layer of the export description.

    ``kind``: ``conv2d`` | ``linear``; ``w_bits``: designed weight bits (None: float weight); ``transform``:
    an online input transform (x − δ)·m stays in the graph; ``rotate``: it includes a Hadamard rotation;
    ``branch_rank``: rank of the merged low-rank branch (0: none); ``act``: the input grid (None: float
    input). ONNX flavours add ``qdq_form`` (``exact`` | ``ort``), ``weight_container`` (int4 | int8 | uint8)
    and ``ort_fallback`` (why the layer is not a fusable node unit); the TFLite flavour may record
    ``transform_folded_into`` (the producer that absorbed the transform); the ``ort`` format records the
    calibrated ``output_grid`` ({lo, hi, sqnr_db})."""

    name: str
    kind: str
    w_bits: int | None
    transform: bool
    rotate: bool
    branch_rank: int = 0
    act: ActInfo | None = None
    qdq_form: str | None = None
    weight_container: str | None = None
    ort_fallback: str | None = None
    transform_folded_into: str | None = None
    output_grid: dict[str, float] | None = None

    @property
    def quantized(self) -> bool:
        """Both the weight and the input activation are quantized (an integer op on every target)."""
        return self.act is not None and self.w_bits is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written into export reports (fields that do not apply are left out)."""
        always = ("kind", "w_bits", "transform", "rotate", "branch_rank")
        d = {k: v for k, v in asdict(self).items() if k != "name" and (v is not None or k in always)}
        if self.qdq_form is not None and self.w_bits is None:
            d["weight_container"] = None
        return d


@dataclass
class ExportDescription:
    """The export-ready module (a folded deep copy of the model, see toolchain/export/prepare.py), the flavour its
    quantized layers were built in (``qdq`` | ``ort`` | ``float``) and one LayerSpec per quantized layer."""

    module: nn.Module
    flavour: str
    layers: dict[str, LayerSpec] = field(default_factory=dict)

    def report_layers(self, names: set[str] | None = None) -> dict[str, dict[str, Any]]:
        """layer → LayerSpec.to_dict(), for ``names`` only when given."""
        return {n: s.to_dict() for n, s in self.layers.items() if names is None or n in names}
