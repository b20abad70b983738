"""Safe ``--out`` handling: never destroy what the toolchain did not write, never run twice at once.

Every stage that writes an ``--out`` calls one of the ``check_*`` functions *before* any compute:

* an output that is (or contains, or lies inside) one of the stage's inputs is refused, always;
* an existing output of the wrong kind (a file where a folder goes, a folder where a file goes) and an
  existing non-empty folder or file that is not a previous artifact of the same stage are refused
  unless ``overwrite`` is set (``--overwrite``); a previous artifact of the same stage is replaced
  whole when the new one is complete (``toolchain.io.atomic``).

``output_lock`` holds an exclusive lock on a sibling ``.<name>.lock`` file for the duration of a run,
so a second run on the same ``--out`` stops at once with one line instead of racing the first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

from toolchain.errors import OutputError

OVERWRITE_HINT = "choose a new or empty path, or pass --overwrite to replace it"


def _resolved(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_not_input(out: str | os.PathLike, inputs: Sequence[str | os.PathLike], what: str = "--out", replaced_whole: bool = True) -> None:
    """Refuse an output that is an input, or (when the output is ``replaced_whole``) one that holds an input.

    Raises OutputError naming both paths."""
    o = _resolved(out)
    for item in inputs:
        if item is None:
            continue
        i = _resolved(item)
        if o == i:
            raise OutputError(f"{what} {out} is also an input; write the output somewhere else (nothing was changed)")
        if replaced_whole and _is_within(i, o):
            raise OutputError(f"{what} {out} contains the input {item}; replacing it would delete that input — "
                              "write the output somewhere else (nothing was changed)")


def _listing(path: Path, limit: int = 3) -> str:
    names = sorted(p.name for p in path.iterdir())
    more = f", … {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_output_dir(out: str | os.PathLike, kind: str, is_artifact: Callable[[Path], bool] | None = None,
                     inputs: Sequence[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """Validate a folder artifact's ``--out`` before any compute; returns it as a Path.

    Accepted: a missing path, an empty folder, a folder for which ``is_artifact`` is true (a previous
    artifact of this stage, replaced whole on success), anything else only with ``overwrite``.
    Inputs are never overwritten, ``overwrite`` or not. Raises OutputError."""
    out = Path(out)
    check_not_input(out, inputs)
    if not out.exists() and not out.is_symlink():
        return out
    if not out.is_dir():
        if overwrite:
            return out
        raise OutputError(f"--out {out} is an existing file, not a {kind} folder; {OVERWRITE_HINT}")
    if not any(out.iterdir()) or (is_artifact is not None and is_artifact(out)) or overwrite:
        return out
    raise OutputError(f"--out {out} is a non-empty folder that is not a {kind} (it holds {_listing(out)}); {OVERWRITE_HINT}")


def check_output_file(out: str | os.PathLike, kind: str, is_artifact: Callable[[Path], bool] | None = None,
                      inputs: Sequence[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """Validate a file artifact's ``--out`` before any compute (same rules as ``check_output_dir``).

    An existing folder at ``out`` is always refused (a file cannot replace it without deleting it)."""
    out = Path(out)
    check_not_input(out, inputs)
    if out.is_dir():
        raise OutputError(f"--out {out} is an existing folder; give a file path for the {kind}")
    if out.exists() and not overwrite and not (is_artifact is not None and is_artifact(out)):
        raise OutputError(f"--out {out} already exists and was not written by this command; {OVERWRITE_HINT}")
    return out


def check_output_files_into(folder: str | os.PathLike, names: Sequence[str], inputs: Sequence[str | os.PathLike] = (),
                            overwrite: bool = False, is_artifact: Callable[[Path], bool] | None = None) -> Path:
    """Validate a folder that receives individual files (``restore``): not an input folder, not a file,
    and no existing file of the same name is replaced unless ``is_artifact`` says this stage wrote it
    or ``overwrite`` is set. Raises OutputError."""
    folder = Path(folder)
    o = _resolved(folder)
    for item in inputs:
        i = _resolved(item)
        if o == i or (i.is_file() and o == i.parent):
            raise OutputError(f"--out {folder} is the folder of the input {item}; the results would overwrite the originals — "
                              "write them somewhere else (nothing was changed)")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is an existing file, not a folder")
    clashes = [n for n in names if (folder / n).exists() and not (is_artifact is not None and is_artifact(folder / n))]
    if clashes and not overwrite:
        more = f" and {len(clashes) - 1} more" if len(clashes) > 1 else ""
        raise OutputError(f"--out {folder} already holds {clashes[0]}{more}; {OVERWRITE_HINT}")
    return folder


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file used for ``out``: a hidden sibling, so the artifact itself stays clean."""
    out = Path(out).expanduser().absolute()
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock for ``out`` while the block runs.

    A second holder gets OutputError at once ("another toolchain run (pid N) is writing …"). The lock
    is released (and its file removed) when the block exits, also on errors and Ctrl-C; a crashed
    process releases it through the kernel, so a stale file never blocks a later run."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(f"another toolchain run (pid {holder}) is writing to {out}; wait for it to finish "
                              f"or choose another --out (lock: {path})") from None
        # the previous holder may have removed the file between our open and our lock: retry on a fresh one
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
