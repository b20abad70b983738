"""Loading tensors from disk without executing untrusted code.

safetensors files are loaded directly. Pickle-based ``.pt/.pth/.bin`` checkpoints are opened only
with ``torch.load(weights_only=True)``, which refuses arbitrary Python objects; a refusal is reported
as a CheckpointError naming the file. ``.ckpt`` files (PyTorch-Lightning checkpoints, whose callback
state names classes that ``weights_only`` refuses) go through ``toolchain.io.safe_pickle``: a
restricted unpickler that rebuilds tensors and plain containers only, never calls anything the file
names, and keeps only the ``state_dict``.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from toolchain.errors import CheckpointError
from toolchain.io.atomic import atomic_write_bytes
from toolchain.io.safe_pickle import load_restricted, unreadable_reason

PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin"}


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a flat name → tensor mapping (CPU, stored dtypes) from a safetensors or pickle file.

    ``.safetensors`` directly; ``.pt/.pth/.bin`` with ``torch.load(weights_only=True)``; ``.ckpt`` with the
    restricted unpickler (``state_dict`` only). A ``{"state_dict": …}`` wrapper is unwrapped in every
    pickle form. Raises CheckpointError naming ``path`` for missing, unreadable or unsafe files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a valid safetensors file: {unreadable_reason(exc)}") from None
    if path.suffix == ".ckpt":
        return load_restricted(path).tensors
    if path.suffix in PICKLE_SUFFIXES:
        return _load_pickle_weights_only(path)
    raise CheckpointError(f"{path}: unsupported checkpoint type '{path.suffix}' (expected .safetensors, or .pt/.pth/.ckpt/.bin)")


def torch_load_weights_only(path: Path, kind: str = "torch checkpoint") -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    Raises CheckpointError naming ``path``: for a pickle that holds anything but tensors and plain
    containers (quoting only the refused global, never PyTorch's advice to reload with
    weights_only=False, which would run the file's code), and for an unreadable file (``kind`` names
    what was expected). PyTorch's own warnings about the pickle protocol are kept off the terminal.
    """
    import re
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f" (it references {found.group(1)})" if found else ""
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors{what}, and loading it would run code "
            "from the file; do not load it with weights_only=False — convert it to .safetensors where it was made, "
            "or get a weights-only checkpoint"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable {kind}: {unreadable_reason(exc)}") from None


def _load_pickle_weights_only(path: Path) -> dict[str, torch.Tensor]:
    obj = torch_load_weights_only(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a mapping of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} contains no tensors")
    return tensors


def check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse NaN/Inf in any floating-point tensor of ``tensors`` (a state dict read from ``where``).

    Raises CheckpointError naming the first bad tensor and how many tensors are affected."""
    bad = [name for name, t in tensors.items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        first = tensors[bad[0]]
        n = int((~torch.isfinite(first)).sum())
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        raise CheckpointError(f"{where}: tensor {bad[0]} holds {n} non-finite (NaN/Inf) value(s){more}; "
                              "the file is damaged or came from a diverged run — nothing was written")


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return the string metadata block of a safetensors file (empty dict if none)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or header_len > 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}) or {}, dict):
        raise CheckpointError(f"{path} is not a valid safetensors file (its header is not a JSON object)")
    return dict(header.get("__metadata__", {}) or {})


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Save tensors atomically as safetensors (contiguous copies; shared storage is split)."""
    flat = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(flat, metadata=metadata))
