"""Writes files in the layouts of the upstream OSDFace release, for tests (no real weights).

* ``lightning_ckpt`` — a PyTorch-Lightning-1.x-style pickle: ``state_dict`` plus epoch/step, optimizer
  state and callback state keyed by a *class reference* (``pytorch_lightning.callbacks.model_checkpoint.
  ModelCheckpoint``), which is exactly what makes ``torch.load(weights_only=True)`` refuse it;
* ``malicious_pickle`` — a pickle whose unpickling would run a shell command (``os.system`` through
  ``__reduce__``) that creates a marker file.

The fake Lightning module exists only while a file is being written (pickle stores classes by
name), so loaders under test cannot import it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections import OrderedDict
from pathlib import Path

import torch

LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


@contextlib.contextmanager
def _fake_lightning():
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING_MODULE]
    saved = {n: sys.modules.get(n) for n in names}
    mod = types.ModuleType(LIGHTNING_MODULE)

    class ModelCheckpoint:  # the class whose reference keys Lightning's callback state
        pass

    ModelCheckpoint.__module__ = LIGHTNING_MODULE
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for n in names[:-1]:
        sys.modules[n] = types.ModuleType(n)
    sys.modules[LIGHTNING_MODULE] = mod
    try:
        yield ModelCheckpoint
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


class RunsCommand:
    """Unpickling this calls ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def touch_command(marker: Path) -> str:
    return f"touch '{marker}'"


def lightning_ckpt(path: Path, state_dict: dict[str, torch.Tensor], payload: object | None = None, legacy: bool = False) -> Path:
    """Write ``state_dict`` as a Lightning-1.x-style checkpoint (optionally with ``payload`` in its hparams)."""
    with _fake_lightning() as ModelCheckpoint:
        obj = {
            "epoch": 3,
            "global_step": 12000,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": OrderedDict(state_dict),
            "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.25), "best_model_path": "x.ckpt"}},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-4}]}],
            "lr_schedulers": [],
            "hyper_parameters": {"payload": payload} if payload is not None else {},
        }
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def malicious_pickle(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A torch pickle that is nothing but an ``os.system`` call creating ``marker``."""
    torch.save(RunsCommand(touch_command(marker)), path, _use_new_zipfile_serialization=not legacy)
    return path
