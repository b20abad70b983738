"""Float TFLite from the export-ready module (litert-torch), and which layers a part runs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def convert_float(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> bytes:
    import litert_torch

    with tempfile.TemporaryDirectory() as tmp:
        edge = litert_torch.convert(module.eval(), inputs)
        edge.export(str(Path(tmp) / "float.tflite"))
        return (Path(tmp) / "float.tflite").read_bytes()


def layer_usage(module: torch.nn.Module, wrapped: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[set[str], set[str]]:
    """(layers the exported part runs, those of them whose input does not depend on the part's input).

    A part (e.g. the UNet) runs only some of the model's layers; a constant-input layer (e.g. the time
    embedding of a one-step model) is folded into a constant by the converter, so it has no op to quantize."""
    from toolchain.export.prepare import ExportQuantLayer

    seen: dict[str, list[tuple]] = {}

    def fingerprint(t: torch.Tensor) -> tuple:  # not the tensor: at 512 px the inputs of all layers would take > 10 GB
        flat = t.detach().reshape(-1)
        return tuple(t.shape), float(flat.double().sum()), float(flat.abs().double().sum()), tuple(flat[:: max(1, flat.numel() // 64)].tolist())

    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, []).append(fingerprint(a[0])))
             for n, m in module.named_modules() if isinstance(m, ExportQuantLayer)]
    try:
        with torch.no_grad():
            wrapped(*inputs)
            wrapped(*[t + 0.25 * torch.randn(t.shape, generator=torch.Generator().manual_seed(7)) for t in inputs])
    finally:
        for h in hooks:
            h.remove()
    return set(seen), {n for n, xs in seen.items() if len(xs) == 2 and xs[0] == xs[1]}
