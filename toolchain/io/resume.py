"""Resume safety: an interrupted run's work folder is reused only by a run with the same recorded inputs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from toolchain.io.atomic import atomic_write_json


def prepare_workdir(workdir: Path, inputs: dict) -> None:
    """Keep an interrupted run's work folder only if it was made from the same ``inputs`` (a JSON-ready dict:
    options, input hashes, versions — compare values after a JSON round trip); otherwise delete it and
    start over, saying on stderr which inputs changed. Records ``inputs`` in ``<workdir>/run_inputs.json``."""
    inputs = json.loads(json.dumps(inputs, default=str))
    record = workdir / "run_inputs.json"
    if workdir.exists():
        try:
            old = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if not isinstance(old, dict):
            old = None
        if old != inputs:
            changed = "its inputs are not recorded" if old is None else \
                ", ".join(k for k in sorted(set(old) | set(inputs)) if old.get(k) != inputs.get(k)) + " changed"
            print(f"note: not resuming the interrupted run in {workdir} ({changed}); starting over", file=sys.stderr)
            shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, inputs)
