"""Atomic writes: an artifact is either complete on disk or absent.

Files are written to a temporary sibling and renamed into place (rename is atomic on POSIX);
directories are staged under a temporary name and swapped in, so an interrupted stage never
leaves a partial artifact that a later stage could mistake for a finished one. A multi-file artifact
(a TFLite export: model, float model, precision sidecar) is staged the same way and swapped in as a
whole (``atomic_file_group``).

Files and folders get the permissions the user's umask gives (0644/0755 under 022), not the
0600/0700 of ``tempfile``'s private staging names.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (0o666/0o777 minus the umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary sibling + fsync + rename), mode per the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (numpy/torch values via ``tolist``, paths as strings)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def _staging(parent: Path, stem: str) -> Iterator[Path]:
    """A fresh ``parent/.<stem>.*.partial`` folder (created with ``parent``, umask applied), removed if the block
    raises; on success it is left for the caller to move into place."""
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=".partial", dir=parent))
    apply_umask(staging, directory=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging directory that replaces ``path`` only if the block succeeds.

    An existing ``path`` is kept until the new one is complete, then removed — callers decide
    beforehand whether it may be replaced (``toolchain.io.outputs.check_output_dir``).
    """
    path = Path(path)
    with _staging(path.parent, path.name) as staging:
        yield staging
    swap_into_place(staging, path)


def swap_into_place(staging: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename the finished folder ``staging`` to ``path``; a previous ``path`` (file or folder) is moved
    aside first, put back if the rename fails, and removed once the new one is in place."""
    staging, path = Path(staging), Path(path)
    old = None
    if path.exists() or path.is_symlink():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    try:
        os.replace(staging, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        _remove(old)
    apply_umask(path, directory=True)
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_file_group(folder: str | os.PathLike, stem: str, stale: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a staging folder for a multi-file artifact; on success every file in it replaces its
    namesake in ``folder`` as one unit, and the files named in ``stale`` (members of the previous
    artifact that the new one may lack, e.g. a precision sidecar) are removed if not re-written.

    If a rename fails half-way, the files already moved are moved back, so ``folder`` holds the old
    artifact or the new one, never a mix (short of a power cut between two renames)."""
    folder = Path(folder)
    with _staging(folder, stem) as staging:
        yield staging
    new = sorted(p.name for p in staging.iterdir())
    backup = Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=".old", dir=folder))
    moved_old: list[str] = []
    placed: list[str] = []
    try:
        for name in list(new) + [n for n in stale if n not in new]:
            if (folder / name).exists():
                os.replace(folder / name, backup / name)
                moved_old.append(name)
            if name in new:
                os.replace(staging / name, folder / name)
                placed.append(name)
    except BaseException:
        for name in placed:
            with contextlib.suppress(OSError):
                os.unlink(folder / name)
        for name in moved_old:
            os.replace(backup / name, folder / name)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(backup, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(backup, ignore_errors=True)
