"""Argument helpers shared by several verbs."""

from __future__ import annotations

import argparse
from pathlib import Path

from toolchain.defaults import DEFAULT_MODEL, resolve_model_path  # noqa: F401  (re-exported for the verbs)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (batch sizes, limits, counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help=f"float model: .safetensors file, model dir or diffusers folder (default: bundled {DEFAULT_MODEL.name})")
    p.add_argument("--preset", default=None, help="architecture preset for files that carry no config (tiny, ref, osdface, osediff, osediff-tiny)")
    if checkpoint:
        p.add_argument("--checkpoint", type=Path, default=None, help="quantized checkpoint directory (from `toolchain quantize`)")


def finite_float(text: str) -> float:
    """argparse type: a finite float (NaN and ±Inf are refused; budgets and tolerances must be numbers)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_overwrite_arg(p: argparse.ArgumentParser, what: str = "replace an existing --out that this command did not write") -> None:
    """--overwrite: allow replacing foreign files at --out (inputs are never replaced)."""
    p.add_argument("--overwrite", action="store_true", help=f"{what} (inputs are never replaced)")


def add_runtime_args(p: argparse.ArgumentParser, distributed: bool = False) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    batch = "images per forward pass (default 4)"
    if distributed:
        batch = ("images per step (default 4); with --nproc-per-node N (or torchrun) this is the global batch, split "
                 "across the N processes (each takes about 1/N), so results match a 1-process run")
    p.add_argument("--batch-size", type=positive_int, default=4, help=batch)


def load_any_model(args: argparse.Namespace, device):
    """The quantized checkpoint if --checkpoint is given, else the float model."""
    from toolchain.models.storage import load_model
    from toolchain.quant.checkpoint import load_quantized

    if getattr(args, "checkpoint", None) is not None:
        model, _ = load_quantized(args.checkpoint, device)
        return model
    return load_model(resolve_model_path(args.model), args.preset).to(device)


def add_nproc_arg(p: argparse.ArgumentParser) -> None:
    """--nproc-per-node: re-launch this command as N data-parallel ranks through torchrun."""
    p.add_argument("--nproc-per-node", type=positive_int, default=None, metavar="N",
                   help="run as N processes on this machine (one GPU each on CUDA, gloo on the CPU) by re-launching "
                        "through torchrun; same as `torchrun --nproc-per-node N -m toolchain ...`")


def maybe_relaunch(args: argparse.Namespace) -> int | None:
    """If ``--nproc-per-node N`` (N > 1) was given outside torchrun, run the same command line as N ranks
    through ``torch.distributed.run`` and return its exit status; else None (run here).

    Under torchrun, an ``--nproc-per-node`` that disagrees with the launched ranks is a UsageError."""
    import os

    from toolchain.errors import UsageError

    n = getattr(args, "nproc_per_node", None)
    if "LOCAL_WORLD_SIZE" in os.environ:
        if n is not None and n != int(os.environ["LOCAL_WORLD_SIZE"]):
            raise UsageError(f"--nproc-per-node {n} disagrees with torchrun's {os.environ['LOCAL_WORLD_SIZE']} processes per node; "
                             "give it to one of them only")
        return None
    if n is None or n == 1:
        return None
    from toolchain import distributed

    argv = getattr(args, "argv", None)
    if argv is None:
        raise UsageError("--nproc-per-node needs the command line (run through `toolchain ...`), or start with torchrun")
    return distributed.relaunch(n, list(argv))
