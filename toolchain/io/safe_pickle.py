"""Reading tensors out of untrusted torch pickles without running any of their code.

``torch.load(weights_only=True)`` refuses a pickle that names any class outside its allowlist.
PyTorch-Lightning 1.x checkpoints (upstream OSDFace's ``associate_2.ckpt``) key their callback
state by a class reference, so they are refused although their ``state_dict`` is plain tensors.
This module unpickles such files with a restricted unpickler:

* only tensor rebuild functions, storage types and plain containers (``OrderedDict``, ``set``,
  ``frozenset``, ``torch.Size``, latin-1 ``bytes``) resolve to real objects — and the tensor
  rebuilds are this module's own functions, not torch's;
* every other global (``os.system``, ``builtins.eval``, Lightning classes, numpy reconstructors …)
  becomes an inert placeholder class: calling, instantiating or ``__setstate__``-ing it only records
  its arguments, so nothing named by the file is ever imported or called;
* tensors stay lazy (storage key, dtype, view) until they are kept, so optimizer states and other
  discarded entries are never read from disk.

Both torch serialisation formats are read: the zip format (``<root>/data.pkl`` + ``<root>/data/<key>``,
torch ≥ 1.6) and the legacy sequential format (magic number, protocol, system info, main pickle,
storage key list, then each storage as an int64 element count followed by its raw bytes).
Upstream sources followed: PyTorch ``torch/serialization.py`` (file layout), OSDFace ``lq_embed/
inference.py`` (``torch.load(...)["state_dict"]``).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from toolchain.errors import CheckpointError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}


class Placeholder:
    """Stands in for a global the restricted unpickler refused; it never calls the real object.

    ``quarantined`` is the ``module.name`` the pickle asked for; ``args``/``kwargs``/``state``/``items``
    record what the pickle tried to pass to it.
    """

    quarantined = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state, self.items, self.list = args, kwargs, None, {}, []

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.list.append(value)

    def extend(self, values: Any) -> None:
        self.list.extend(values)

    def __repr__(self) -> str:
        return f"<quarantined {self.quarantined}>"


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass
class LazyTensor:
    """A tensor view recorded by the unpickler; its bytes are read only by ``materialize``."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class RestrictedLoad:
    """What ``load_restricted`` found: the kept tensors and what it refused or dropped."""

    tensors: dict[str, torch.Tensor]
    quarantined: list[str] = field(default_factory=list)   # sorted "module.name" globals replaced by placeholders
    dropped_top_level: list[str] = field(default_factory=list)  # top-level keys not kept (Lightning metadata)
    lightning: bool = False


def unreadable_reason(exc: BaseException) -> str:
    """One printable line saying why a file could not be read: 'truncated or damaged' plus the first line
    of the library's reason with control characters and bytes that are not text removed (≤ 120 chars)."""
    first = (str(exc).splitlines() or [""])[0]
    text = "".join(c if c.isprintable() and ord(c) < 0x2500 else "?" for c in first)
    text = re.sub(r"\?{2,}", "…", text).strip()[:120]
    return f"the file is truncated or damaged ({type(exc).__name__}{': ' + text if text else ''})"


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *rest: Any) -> Any:
    # torch._utils._rebuild_tensor / _rebuild_tensor_v2: (storage, offset, size, stride[, requires_grad, hooks, meta])
    if not isinstance(storage, _StorageRef):
        return Placeholder("tensor over a non-storage")
    return LazyTensor(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride), storage.dtype)


def _rebuild_tensor_v3(storage: Any, offset: int, size: Any, stride: Any, requires_grad: Any, hooks: Any,
                       dtype: Any, *rest: Any) -> Any:
    t = _rebuild_tensor(storage, offset, size, stride)
    if isinstance(t, LazyTensor) and isinstance(dtype, torch.dtype):
        t.dtype = dtype
    return t


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if func in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter):
        return func(*args)
    return Placeholder("tensor subclass")


def _latin1_bytes(text: Any, encoding: str = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin-1 byte strings are rebuilt")
    return text.encode("latin1")


def _safe_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
        ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset,
        ("torch", "Size"): torch.Size,
        ("_codecs", "encode"): _latin1_bytes,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(dtype)
    for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"):
        allowed[("torch", name)] = getattr(torch, name)
    return allowed


_ALLOWED = _safe_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, on_storage: Callable[[tuple], _StorageRef]):
        super().__init__(file)
        self._on_storage = on_storage
        self.quarantined: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        hit = _ALLOWED.get((module, name))
        if hit is not None:
            return hit
        qualified = f"{module}.{name}"
        self.quarantined.add(qualified)
        return type(name, (Placeholder,), {"quarantined": qualified, "__module__": "quarantined"})

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        return self._on_storage(pid)


class _ZipReader:
    def __init__(self, path: Path):
        self.zf = zipfile.ZipFile(path)
        names = self.zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise CheckpointError(f"{path} is a zip file but not a torch checkpoint (no <root>/data.pkl)")
        self.root = pkl[0][: -len("data.pkl")]
        order = f"{self.root}byteorder"
        if order in names and self.zf.read(order).decode().strip() != "little":
            raise CheckpointError(f"{path} was saved on a big-endian machine; convert it there with torch.save first")
        self.refs: dict[str, _StorageRef] = {}

    def pickle_bytes(self) -> bytes:
        return self.zf.read(f"{self.root}data.pkl")

    def on_storage(self, pid: tuple) -> _StorageRef:
        _, stype, key, _location, numel = pid[:5]
        ref = _StorageRef(str(key), stype.dtype, int(numel))
        self.refs.setdefault(ref.key, ref)
        return ref

    def read(self, ref: _StorageRef) -> bytes:
        return self.zf.read(f"{self.root}data/{ref.key}")


class _LegacyReader:
    def __init__(self, path: Path):
        self.f = open(path, "rb")  # noqa: SIM115 — closed by load_restricted
        self.refs: dict[str, _StorageRef] = {}
        self.offsets: dict[str, int] = {}

    def on_storage(self, pid: tuple) -> _StorageRef:
        _, stype, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("legacy storage views are not supported")
        ref = _StorageRef(str(key), stype.dtype, int(numel))
        self.refs.setdefault(ref.key, ref)
        return ref

    def index_storages(self, keys: list[str]) -> None:
        for key in keys:
            ref = self.refs.get(str(key))
            count = struct.unpack("<q", self.f.read(8))[0]
            self.offsets[str(key)] = self.f.tell()
            if ref is None:
                raise pickle.UnpicklingError(f"storage {key} is never referenced")
            self.f.seek(count * ref.dtype.itemsize, os.SEEK_CUR)

    def read(self, ref: _StorageRef) -> bytes:
        self.f.seek(self.offsets[ref.key])
        return self.f.read(ref.numel * ref.dtype.itemsize)


def _materialize(t: LazyTensor, reader: Any, cache: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    ref = t.storage
    if ref.key not in cache:
        raw = reader.read(ref)
        if len(raw) != ref.numel * ref.dtype.itemsize:
            raise CheckpointError(f"{where}: storage {ref.key} holds {len(raw)} bytes, the pickle declares {ref.numel} × {ref.dtype}")
        cache[ref.key] = torch.frombuffer(bytearray(raw), dtype=ref.dtype) if raw else torch.empty(0, dtype=ref.dtype)
    flat = cache[ref.key]
    if t.dtype != ref.dtype:
        flat = flat.view(torch.uint8).view(t.dtype) if flat.numel() else torch.empty(0, dtype=t.dtype)
    extent = t.offset + sum((s - 1) * st for s, st in zip(t.size, t.stride) if s > 0) + 1 if all(t.size) else t.offset
    if len(t.size) != len(t.stride) or t.offset < 0 or any(st < 0 for st in t.stride) or extent > flat.numel():
        raise CheckpointError(f"{where}: a tensor view {t.size} runs past its storage ({flat.numel()} elements)")
    return flat.as_strided(t.size, t.stride, t.offset).clone()


def load_restricted(path: str | os.PathLike) -> RestrictedLoad:
    """Read the tensors of a torch pickle (zip or legacy format) without executing anything in it.

    Returns the flat ``name → tensor`` mapping (CPU, the dtypes stored in the file): the file's
    ``state_dict`` entry when it has one (a Lightning checkpoint: every other top-level entry is
    dropped unread), otherwise the top-level mapping itself. Globals other than tensor rebuilds and
    plain containers are replaced by inert placeholders and listed in ``quarantined``.

    Raises CheckpointError (naming ``path``) when the file is not a torch pickle, when what is kept
    is not a mapping of string → tensor (e.g. a payload that tried to call ``os.system``: reported,
    never called), or when a tensor view does not fit its storage.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    reader: Any = None
    try:
        if zipfile.is_zipfile(path):
            reader = _ZipReader(path)
            up = _RestrictedUnpickler(io.BytesIO(reader.pickle_bytes()), reader.on_storage)
            obj = up.load()
        else:
            reader = _LegacyReader(path)
            up0 = _RestrictedUnpickler(reader.f, reader.on_storage)
            magic = up0.load()
            if magic != _LEGACY_MAGIC:
                raise CheckpointError(f"{path} is not a torch checkpoint (no zip archive, no legacy magic number)")
            up0.load()  # protocol version
            up0.load()  # system info
            up = _RestrictedUnpickler(reader.f, reader.on_storage)
            obj = up.load()
            keys = _RestrictedUnpickler(reader.f, reader.on_storage).load()
            reader.index_storages(list(keys))
    except CheckpointError:
        _close(reader)
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            struct.error, zipfile.BadZipFile, OSError, RecursionError, MemoryError) as exc:
        _close(reader)
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {unreadable_reason(exc)}") from None

    try:
        return _keep_state_dict(path, obj, sorted(up.quarantined), reader)
    finally:
        _close(reader)


def _close(reader: Any) -> None:
    if isinstance(reader, _LegacyReader):
        reader.f.close()
    elif isinstance(reader, _ZipReader):
        reader.zf.close()


def _keep_state_dict(path: Path, obj: Any, quarantined: list[str], reader: Any) -> RestrictedLoad:
    lightning = isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)
    dropped: list[str] = []
    if lightning:
        dropped = sorted(str(getattr(k, "quarantined", k)) for k in obj if k != "state_dict")
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        what = obj.quarantined if isinstance(obj, Placeholder) else type(obj).__name__
        found = f"; it names {', '.join(quarantined[:3])} (not called)" if quarantined else ""
        raise CheckpointError(f"refusing {path}: it holds a {what}, not a state dict of tensors{found}")
    tensors: dict[str, torch.Tensor] = {}
    cache: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, LazyTensor):
            what = value.quarantined if isinstance(value, Placeholder) else type(value).__name__
            raise CheckpointError(f"refusing {path}: state dict entry {str(key)[:80]!r} is a {what}, not a tensor")
        tensors[key] = _materialize(value, reader, cache, str(path))
    if not tensors:
        raise CheckpointError(f"{path} contains no tensors")
    return RestrictedLoad(tensors, quarantined, dropped, lightning)
