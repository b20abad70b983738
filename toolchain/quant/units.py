"""The model cut into reconstruction units (blocks) and stages, in forward order.

Block-wise methods (Q-Diffusion's BRECQ/AdaRound, QArtSR's reversed per-module calibration) and
stage-wise ones (PassionSR's distributed calibration) need the same map of the network: which
quantized layers belong to which block, and the order in which data flows through the blocks.
Module registration order is not forward order in diffusers (``up_blocks`` is registered before
``mid_block``); each model kind's order and stages come from ``toolchain.topology``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from toolchain.quant.calibrate import quant_layers
from toolchain.topology import topology_of


@dataclass
class Unit:
    name: str  # module path of the block (or of a single layer)
    layers: list[str] = field(default_factory=list)  # quantized layers inside it
    stage: str = "other"  # calibration stage owning the block (Topology.stage_of)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def reconstruction_units(model: nn.Module) -> list[Unit]:
    """Blocks holding quantized layers, in forward order; every quantized layer is in exactly one."""
    topo = topology_of(model)
    names = dict(model.named_modules())
    layers = [n for n, _ in quant_layers(model)]
    taken: set[str] = set()
    units: list[Unit] = []

    def add(path: str) -> None:
        members = [n for n in layers if _under(n, path) and n not in taken]
        if members:
            taken.update(members)
            units.append(Unit(path, members, topo.stage_of(path)))

    for prefix, children in topo.forward_order:
        if prefix not in names:
            continue
        for child in children:
            path = f"{prefix}.{child}"
            module = names.get(path)
            if isinstance(module, nn.ModuleList):
                for i in range(len(module)):
                    add(f"{path}.{i}")
            elif module is not None:
                add(path)
        for n in layers:  # whatever the listed children did not cover, one layer per unit
            if _under(n, prefix) and n not in taken:
                add(n)
    for n in layers:
        if n not in taken:
            add(n)
    return units


def stage_units(model: nn.Module, stage: str) -> list[Unit]:
    return [u for u in reconstruction_units(model) if u.stage == stage]


@contextlib.contextmanager
def capture_outputs(model: nn.Module, paths: list[str]) -> Iterator[dict[str, Any]]:
    """Record the output of each module in ``paths`` during the forward passes inside the block."""
    seen: dict[str, Any] = {}
    handles = [model.get_submodule(p).register_forward_hook(lambda m, a, out, p=p: seen.__setitem__(p, out)) for p in paths]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_inputs(model: nn.Module, path: str) -> Iterator[list[tuple[tuple, dict]]]:
    """Record (args, kwargs) of every call of one module, detached and moved to the CPU."""
    calls: list[tuple[tuple, dict]] = []

    def hook(mod, args, kwargs):
        calls.append((to_cpu(args), to_cpu(kwargs)))

    handle = model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def map_leaves(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with every leaf replaced by ``fn(leaf)``, through nested tuples, lists and dicts (the
    (args, kwargs) structures captured from a block's forward). Containers are rebuilt, never mutated."""
    if isinstance(obj, tuple):
        return tuple(map_leaves(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_leaves(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_leaves(v, fn) for k, v in obj.items()}
    return fn(obj)


def to_cpu(obj: Any) -> Any:
    """Every tensor in a nested structure detached and moved to the CPU; other leaves unchanged."""
    return map_leaves(obj, lambda o: o.detach().cpu() if isinstance(o, torch.Tensor) else o)


def to_device(obj: Any, device: torch.device) -> Any:
    """Every tensor in a nested structure moved to ``device``; other leaves unchanged."""
    return map_leaves(obj, lambda o: o.to(device) if isinstance(o, torch.Tensor) else o)


class _Row:
    """Placeholder for the ``index``-th per-sample tensor in a structure split by ``split_samples``."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def split_samples(obj: Any, n: int) -> tuple[tuple[torch.Tensor, ...], Callable[[Sequence[torch.Tensor]], Any]]:
    """The per-sample tensors of a nested (args, kwargs)-like structure and a function that rebuilds it.

    Per-sample are the tensors whose first dimension is the batch size ``n``; they come back in a flat
    tuple (what ``fit(batches=...)`` shards across ranks), and ``rebuild(rows)`` puts ``rows`` (those
    tensors or the same rows of each) back in their places. Every other leaf (None, ints, a tensor not
    laid out by sample, e.g. a prompt kept as (1, T, D)) stays in the structure as it is: every rank
    sees it whole. A tensor that is not per sample but happens to have ``n`` rows would be split too."""
    rows: list[torch.Tensor] = []

    def cut(o: Any) -> Any:
        if isinstance(o, torch.Tensor) and o.dim() > 0 and o.shape[0] == n:
            rows.append(o)
            return _Row(len(rows) - 1)
        return o

    template = map_leaves(obj, cut)

    def rebuild(parts: Sequence[torch.Tensor]) -> Any:
        if len(parts) != len(rows):
            raise ValueError(f"expected {len(rows)} per-sample tensors, got {len(parts)}")
        return map_leaves(template, lambda o: parts[o.index] if isinstance(o, _Row) else o)

    return tuple(rows), rebuild


def tensors_of(out: Any) -> list[torch.Tensor]:
    """The tensors in a block's output (diffusers blocks return tensors or nested tuples)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in tensors_of(o)]
    if hasattr(out, "to_tuple"):
        return tensors_of(out.to_tuple())
    return []


def output_error(out: Any, target: Any) -> torch.Tensor:
    """Σ over feature dims, mean over the batch, of the squared error (BRECQ's reconstruction loss)."""
    total = None
    for o, t in zip(tensors_of(out), tensors_of(target)):
        e = (o.float() - t.to(o.device).float()).pow(2).flatten(1).sum(1).mean()
        total = e if total is None else total + e
    if total is None:
        raise ValueError("block produced no tensor output")
    return total
