"""One-time conversion of a torch pickle checkpoint to a safetensors file.

Upstream OSDFace ships ``associate_2.ckpt`` (a PyTorch-Lightning pickle) and ``embedding_change_weights.pth``;
converting them once lets every later load skip pickle entirely.
"""

from __future__ import annotations

import os
from pathlib import Path

from toolchain.errors import CheckpointError
from toolchain.io.hashing import sha256_file
from toolchain.io.weights import check_finite, load_tensors, save_tensors


def file_record(path: str | os.PathLike) -> dict:
    """{"path", "name", "bytes", "sha256"} of a source file, as import reports record them."""
    path = Path(path)
    return {"path": str(path), "name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def pickle_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Write the tensors of ``src`` (.ckpt via the restricted unpickler, .pt/.pth/.bin weights-only) to ``dst``.

    ``dst`` must end in ``.safetensors``; it is written atomically, with the source file name and
    SHA-256 in its metadata (``source``, ``source_sha256``). Returns a one-line summary.
    Raises CheckpointError naming the file for unsafe/unreadable input or a bad destination name.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"the converted file must end in .safetensors: {dst}")
    tensors = load_tensors(src)
    check_finite(tensors, str(src))  # a damaged file stays unconverted rather than becoming a clean-looking one
    save_tensors(dst, tensors, metadata={"source": src.name, "source_sha256": sha256_file(src)})
    n = sum(t.numel() for t in tensors.values())
    return f"{len(tensors)} tensors, {n:,} values"
