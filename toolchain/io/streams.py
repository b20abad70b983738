"""Keep stdout for machine-readable output: route library chatter to stderr."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout inside the block — Python ``print`` and native code writing to
    file descriptor 1 (converters, TF/absl) — to stderr, so a command's JSON summary stays alone on stdout."""
    sys.stdout.flush()
    try:
        fd_out = sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
        saved = os.dup(fd_out)
    except (OSError, ValueError, AttributeError):  # no real fd 1 (embedded): Python-level redirect only
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    try:
        sys.stderr.flush()
        os.dup2(sys.__stderr__.fileno() if sys.__stderr__ is not None else 2, fd_out)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        try:
            sys.stdout.flush()
        finally:
            os.dup2(saved, fd_out)
            os.close(saved)
