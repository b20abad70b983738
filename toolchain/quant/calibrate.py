"""Calibrating a fake-quant model: weight grids and activation ranges.

``calibrate_weights`` sets weight
scales; ``calibrate_activations`` streams calibration batches through the model while the input
quantizers observe, checkpointing the observers so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from toolchain.io.atomic import atomic_write_json
from toolchain.io.weights import load_tensors, save_tensors
from toolchain.quant.surgery import (  # noqa: F401  (model surgery, re-exported for the callers that import it from here)
    prepare_model, quant_layers, quantizers_off, set_quant_mode, set_submodule,
)


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
