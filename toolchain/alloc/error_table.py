"""Per-layer, per-bit-width error table and costs for the integer program.

    L_{i,b} = w_i² · Σ_calib ‖W·X − Q(W)·Q_b(X)‖²_F      (layer output error at activation bits b)
    M_{i,b} = b · (activation elements of layer i)          cost model "act_bits"
            = b · b_w · MACs_i                              cost model "bops"

One hooked forward pass per batch captures each layer's input; the layer's own forward (with
its transform and branches) is then evaluated with weights quantized and the input quantizer
re-derived at every candidate bit-width, against the same forward with quantizers off.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from toolchain.alloc.common import activation_layers, quantizer_at_bits, swapped_input_quantizer
from toolchain.errors import ConfigError

COST_MODELS = ("act_bits", "bops")


def _macs(layer, x: torch.Tensor, y: torch.Tensor) -> int:
    if isinstance(layer, torch.nn.Conv2d):
        return int(y[0].numel() * (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1])
    return int(y[0].numel() * layer.in_features)


def error_table(ckpt: Path, calib: Path, bits: list[int], images: int = 8, batch_size: int = 4, device: str = "cpu") -> dict:
    """{layer: {"errors": {b: Σ‖·‖²}, "elements": per image, "macs": per image, "w_bits": b_w}} (unweighted)."""
    from toolchain.calibration.dataset import CalibrationSet
    from toolchain.quant.calibrate import quantizers_off
    from toolchain.quant.checkpoint import load_quantized

    model, _ = load_quantized(ckpt, device)
    data = CalibrationSet.open(calib)
    batches = data.batches(model.image_size, batch_size, limit=images)
    layers = activation_layers(model)
    table = {n: {"errors": {str(b): 0.0 for b in bits}, "elements": 0, "macs": 0, "w_bits": l.w_bits, "order": -1} for n, l in layers.items()}
    order = iter(range(len(table)))
    handles = []

    def hook_for(name, layer):
        def hook(mod, args, out):
            x, ref = args[0], out  # the model runs with every quantizer off: ``out`` is W·X
            table[name]["elements"] = x[0].numel()
            if table[name]["order"] < 0:
                table[name]["order"] = next(order)  # execution order, for plots along the network
            table[name]["macs"] = _macs(layer, x, ref)
            wq = layer.weight_quantizer
            if wq is not None:
                wq.mode = "quantize"
            try:
                for b in bits:
                    with swapped_input_quantizer(layer, quantizer_at_bits(layer.input_quantizer, b)):
                        y = layer.forward(x)  # Q(W)·Q_b(X), through the layer's transform and branches
                    table[name]["errors"][str(b)] += float((y - ref).double().pow(2).sum())
            finally:
                if wq is not None:
                    wq.mode = "off"
        return hook

    t0 = time.perf_counter()
    for name, layer in layers.items():
        handles.append(layer.register_forward_hook(hook_for(name, layer)))
    try:
        with quantizers_off(model), torch.no_grad():
            for b in tqdm(batches, desc="error table", leave=False, disable=_quiet_rank()):
                model(b.to(device))  # float activations flow; each hook measures its own layer
    finally:
        for h in handles:
            h.remove()
    return {"bits": bits, "images": sum(b.shape[0] for b in batches), "seconds": round(time.perf_counter() - t0, 1), "layers": table}


def cost(entry: dict, bits: int, model: str) -> float:
    if model == "act_bits":
        return float(bits * entry["elements"])
    if model == "bops":
        return float(bits * (entry["w_bits"] or 32) * entry["macs"])
    raise ConfigError(f"unknown cost model '{model}' ({', '.join(COST_MODELS)})")


def _quiet_rank() -> bool:
    """A rank other than 0 under torchrun: its progress bar would repeat rank 0's."""
    from toolchain import distributed as D

    return D.quiet_rank()
