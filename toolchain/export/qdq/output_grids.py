"""Output grids of the ``ort`` QDQ format: every fused conv/matmul output is requantized to uint8, with a
range fitted on sample inputs of the exported part."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from toolchain.errors import ExportError


def default_calib_inputs(model: torch.nn.Module, part: str, images: int = 3) -> list[tuple[torch.Tensor, ...]]:
    """Inputs of ``part`` for the bundled faces (toolchain/calibration/faces), degraded to LQ at the model's input size;
    used for the ``ort`` format's output grids when export is given no calibration set."""
    from toolchain.calibration import BUNDLED_FACES
    from toolchain.calibration.dataset import CalibrationSet, build_calibration_set
    from toolchain.export.parts import part_inputs

    with tempfile.TemporaryDirectory() as tmp:
        root = build_calibration_set([BUNDLED_FACES], Path(tmp) / "set", n=images, size=model.image_size, seed=0, progress=False)
        batches = CalibrationSet.open(root).batches(model.image_size, 1)
    return part_inputs(model, part, batches)


@torch.no_grad()
def calibrate_output_grids(module: torch.nn.Module, wrapped: torch.nn.Module, calib_inputs: list[tuple[torch.Tensor, ...]]
                           ) -> dict[str, tuple[float, float]]:
    """Set the uint8 output grid of every ``ort``-flavour layer of ``module`` that runs in ``wrapped``.

    Runs ``wrapped`` (a part of ``module``) on each input tuple with the output grids off — the values the
    fake-quant model computes — and fits each layer's grid to its conv/matmul output (bias included,
    low-rank branch not): the least-squared-error range among min/max shrunk by 0–60 %
    (``toolchain.export.prepare.output_grid``). Returns layer → (range lo, range hi, SQNR dB of the grid on the
    sampled outputs) for the layers that ran; layers of other parts are left uncalibrated (they are not
    in the graph). Raises ExportError with no inputs."""
    from toolchain.export.prepare import ExportQuantLayer, output_grid

    if not calib_inputs:
        raise ExportError("the ort QDQ format needs sample inputs to calibrate the op output grids")
    layers = {n: m for n, m in module.named_modules() if isinstance(m, ExportQuantLayer) and m.flavour == "ort"}
    for layer in layers.values():
        layer.output_range, layer.output_samples = (), []
        layer.out_calibrated = False
    grids: dict[str, tuple[float, float, float]] = {}
    try:
        for inp in calib_inputs:
            wrapped(*inp)
        for n, layer in layers.items():
            if layer.output_range:
                grids[n] = output_grid(torch.cat(layer.output_samples), *layer.output_range)
    finally:
        for layer in layers.values():
            layer.output_range, layer.output_samples = None, []
    for n, (lo, hi, _) in grids.items():
        layers[n].set_output_range(lo, hi)
    return grids
