"""Turning a float model into a calibrated fake-quant model.

``prepare_model`` swaps in quantized layers per the config; ``calibrate_weights`` sets weight
scales; ``calibrate_activations`` streams calibration batches through the model while the input
quantizers observe, checkpointing the observers so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from toolchain.io.atomic import atomic_write_json
from toolchain.io.weights import load_tensors, save_tensors
from toolchain.quant.config import QuantConfig, quantizable_layers
from toolchain.quant.layers import QUANT_LAYER_TYPES, QuantLayerMixin, is_quant_layer


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def prepare_model(model: nn.Module, config: QuantConfig) -> list[str]:
    """Replace every in-scope Conv2d/Linear by its quantized twin (in place); return their names."""
    replaced = []
    for name, module in list(quantizable_layers(model)):
        if is_quant_layer(module):
            continue
        specs = config.layer_specs(name)
        if specs is None:
            continue
        qcls = QUANT_LAYER_TYPES.get(type(module))
        if qcls is None:
            continue
        set_submodule(model, name, qcls.from_float(module, *specs))
        replaced.append(name)
    return replaced


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayerMixin]]:
    for name, module in model.named_modules():
        if is_quant_layer(module):
            yield name, module


def set_quant_mode(model: nn.Module, weights: str | None = None, activations: str | None = None) -> None:
    """Switch all quantizers: mode is 'quantize' or 'off' (None leaves that side unchanged)."""
    for _, layer in quant_layers(model):
        if weights is not None and layer.weight_quantizer is not None:
            layer.weight_quantizer.mode = weights
        if activations is not None and layer.input_quantizer is not None:
            layer.input_quantizer.mode = activations


@contextlib.contextmanager
def quantizers_off(model: nn.Module) -> Iterator[None]:
    """Temporarily run every quantizer as identity (restoring each one's mode afterwards)."""
    saved = [(q, q.mode) for _, layer in quant_layers(model) for q in (layer.weight_quantizer, layer.input_quantizer) if q is not None]
    for q, _ in saved:
        q.mode = "off"
    try:
        yield
    finally:
        for q, mode in saved:
            q.mode = mode


def calibrate_weights(model: nn.Module) -> None:
    for _, layer in quant_layers(model):
        layer.calibrate_weight()


def _fingerprint(model: nn.Module, n_batches: int) -> str:
    desc = json.dumps({n: [l.w_bits, l.a_bits, l.input_quantizer.spec.to_dict() if l.input_quantizer else None] for n, l in quant_layers(model)}, sort_keys=True)
    return hashlib.sha256(f"{desc}|{n_batches}".encode()).hexdigest()[:16]


def calibrate_activations(
    model: nn.Module,
    batches: Sequence[torch.Tensor] | Iterable[torch.Tensor],
    state_dir: str | Path | None = None,
    checkpoint_every: int = 4,
    forward=None,
    desc: str = "calibrating activations",
    names: "set[str] | None" = None,
) -> int:
    """Observe every input quantizer over ``batches`` and freeze them. Returns batches used.

    With ``state_dir`` the observer statistics are saved every ``checkpoint_every`` batches; a
    rerun with the same model and data skips the batches already seen. ``names`` restricts the
    (re)calibration to those layers; the others keep their frozen ranges.
    """
    batches = list(batches)
    forward = forward or model
    quantizers = {name: layer.input_quantizer for name, layer in quant_layers(model)
                  if layer.input_quantizer is not None and (names is None or name in names)}
    for q in quantizers.values():
        q.start_observing()
    start = 0
    state_dir = Path(state_dir) if state_dir else None
    fp = _fingerprint(model, len(batches)) + ("" if names is None else hashlib.sha256("|".join(sorted(names)).encode()).hexdigest()[:8])
    if state_dir and (state_dir / "progress.json").is_file():
        progress = json.loads((state_dir / "progress.json").read_text())
        if progress.get("fingerprint") == fp:
            saved = load_tensors(state_dir / "observers.safetensors")
            for name, q in quantizers.items():
                q.observer.load_state_dict({k[len(name) + 1 :]: v for k, v in saved.items() if k.startswith(name + ".")})
            start = int(progress["done"])
            tqdm.write(f"resuming calibration at batch {start}/{len(batches)} from {state_dir}")
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in tqdm(range(start, len(batches)), desc=desc, initial=start, total=len(batches), leave=False, disable=_quiet_rank()):
            forward(batches[i].to(device))
            if state_dir and ((i + 1) % checkpoint_every == 0) and i + 1 < len(batches):
                _save_observers(state_dir, quantizers, i + 1, fp)
    for q in quantizers.values():
        q.freeze()
    if state_dir and state_dir.exists():
        shutil.rmtree(state_dir, ignore_errors=True)
    return len(batches)


def _save_observers(state_dir: Path, quantizers: dict, done: int, fp: str) -> None:
    tensors = {f"{name}.{k}": v for name, q in quantizers.items() for k, v in q.observer.state_dict().items()}
    save_tensors(state_dir / "observers.safetensors", tensors)
    atomic_write_json(state_dir / "progress.json", {"done": done, "fingerprint": fp})


def _quiet_rank() -> bool:
    """A rank other than 0 under torchrun: its progress bar would repeat rank 0's."""
    from toolchain import distributed as D

    return D.quiet_rank()
