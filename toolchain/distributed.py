"""Data parallelism over processes with ``torch.distributed``, launched by ``torchrun``.

A command started by ``torchrun --nproc-per-node N -m toolchain ...`` (or by the convenience
option ``--nproc-per-node N``, which re-launches the command through ``torch.distributed.run``)
runs as N ranks. This module is the only place that talks to ``torch.distributed``:

* ``init_from_env(device)`` joins the process group named by torchrun's environment (NCCL when the
  device is CUDA, gloo on the CPU) and returns this rank's device (``cuda:LOCAL_RANK`` on GPUs);
* ``shard_rows(n)`` is the slice of an ``n``-sample global batch this rank takes (contiguous,
  sizes differ by at most one, earlier ranks take the extra samples; a rank may get none);
* ``all_reduce_grads``/``broadcast_*``/``all_gather``/``barrier`` are thin wrappers that are no-ops
  in a single process, so callers need no ``if``.

Without torchrun's environment (``WORLD_SIZE`` unset or 1) nothing here touches
``torch.distributed`` and every helper is an identity: a 1-process run is unchanged.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable, Iterator

import torch

from toolchain.errors import ConfigError


def launched() -> bool:
    """True when this process was started by torchrun with more than one rank (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def active() -> bool:
    """True when a process group of more than one rank is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes checkpoints and artifacts."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: torch.device) -> torch.device:
    """Join torchrun's process group (if launched and not yet joined); returns this rank's device.

    ``device`` is the device the user asked for: a CUDA device becomes ``cuda:LOCAL_RANK`` (one GPU per
    rank, backend NCCL), anything else stays and uses gloo. Raises ConfigError when there are fewer GPUs
    on this node than local ranks. Outside torchrun (or with one rank) returns ``device`` unchanged."""
    import torch.distributed as dist

    if not launched():
        return device
    device = torch.device(device)
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if local_rank() >= n:
            raise ConfigError(f"rank {local_rank()} on this node has no GPU of its own ({n} visible); "
                              "start at most as many processes per node as there are GPUs, or use --device cpu")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[torch.device]:
    """``init_from_env`` for the duration of a command; the group is left on exit (also on errors)."""
    joined = launched()
    try:
        yield init_from_env(device)
    finally:
        if joined:
            shutdown()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    import torch.distributed as dist

    if active():
        dist.barrier()


def shard_rows(n: int, r: int | None = None, world: int | None = None) -> slice:
    """Rows of an ``n``-sample global batch taken by rank ``r`` of ``world`` (defaults: this process).

    Contiguous blocks in rank order whose sizes differ by at most one (``numpy.array_split``'s rule:
    the first ``n % world`` ranks take one more); concatenating every rank's block gives rows 0..n-1.
    With ``n < world`` the last ranks get an empty slice."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    base, extra = divmod(int(n), world)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def _comm_device(t: torch.Tensor) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over the ranks, in place (a missing gradient counts as zero and
    becomes a zero tensor). Callers weight their local loss so that the sum is the global gradient."""
    import torch.distributed as dist

    if not active():
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for ps in groups.values():  # one collective per dtype/device: a flat buffer instead of one call per tensor
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        dev = _comm_device(flat)
        buf = flat.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        buf = buf.to(flat.device)
        offset = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(buf[offset:offset + n].view_as(p.grad))
            offset += n


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite every tensor with rank ``src``'s values, in place (no-op in a single process).

    Tensors are packed into one flat buffer per dtype (bool travels as uint8), so a model's
    thousands of small buffers cost a few collectives. All ranks must pass the same shapes in the
    same order."""
    import torch.distributed as dist

    if not active():
        return
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            groups.setdefault(t.dtype, []).append(t)
    for dtype, ts in groups.items():
        wire = torch.uint8 if dtype == torch.bool else dtype
        flat = torch.cat([t.detach().reshape(-1).to(wire) for t in ts])
        buf = flat.to(_comm_device(flat))
        dist.broadcast(buf, src)
        buf = buf.cpu()
        offset = 0
        for t in ts:
            n = t.numel()
            t.copy_(buf[offset:offset + n].view(t.shape).to(dtype))
            offset += n


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers of ``module`` (states built from the same data
    can still differ in the last bits on GPUs, e.g. an SVD; training must start from one state)."""
    broadcast_tensors([*module.parameters(), *module.buffers()], src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable value) on every rank."""
    import torch.distributed as dist

    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in a single process."""
    import torch.distributed as dist

    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def torchrun_argv(nproc: int, command: list[str]) -> list[str]:
    """Arguments for ``torch.distributed.run`` that start ``python -m toolchain COMMAND`` on ``nproc``
    local ranks, with a rendezvous on a free local port."""
    return ["--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
            "--module", "toolchain", *command]


# Set by ``relaunch`` for the ranks it starts: the folder where a rank leaves its one-line user error for the
# launcher to print (the ranks print no ``error:``/``interrupted:`` line of their own, so the user sees one).
REPORT_DIR_ENV = "TOOLCHAIN_RANK_REPORTS"


def rank_from_env() -> int:
    """This process's rank from torchrun's environment (0 outside torchrun); needs no process group."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def quiet_rank() -> bool:
    """True on a rank other than 0 under torchrun: it leaves messages meant for the user to rank 0."""
    return launched() and rank_from_env() != 0


def _quiet_elastic_logging() -> None:
    """torchrun's own log lines (``W… Sending process … SIGTERM``, ``E… failed (exitcode: 2)``) repeat what
    the one ``error:``/``interrupted:`` line says; the launcher keeps only its CRITICAL ones."""
    import logging

    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)


def relaunch(nproc: int, command: list[str]) -> int:
    """Run ``toolchain COMMAND`` as ``nproc`` ranks through ``torch.distributed.run`` (torchrun) and wait.

    Returns 0, or 1 when a rank crashed (its traceback is on stderr). A user error in a rank is raised
    here again as a ToolchainError with the rank's message (the lowest rank that reported one), and an
    interruption (Ctrl-C to the launcher or to the ranks) as KeyboardInterrupt, so the caller prints
    one line and exits 2 or 130. On the CPU each rank gets an equal share of the cores (torchrun would
    otherwise set OMP_NUM_THREADS=1)."""
    import signal
    import tempfile
    from pathlib import Path

    previous_level = os.environ.get("LOGLEVEL")
    os.environ["LOGLEVEL"] = "CRITICAL"  # torchrun's loggers take their level from LOGLEVEL when their module is imported
    try:
        from torch.distributed import run as torchrun
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    finally:
        if previous_level is None:
            os.environ.pop("LOGLEVEL", None)
        else:
            os.environ["LOGLEVEL"] = previous_level
    _quiet_elastic_logging()

    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    with tempfile.TemporaryDirectory(prefix="toolchain-ranks-") as reports:
        os.environ[REPORT_DIR_ENV] = reports
        try:
            torchrun.run(torchrun.parse_args(torchrun_argv(nproc, command)))
        except SignalException as exc:
            raise KeyboardInterrupt from exc  # one ``interrupted:`` line from the caller; the ranks stay quiet
        except ChildFailedError as exc:
            codes = [f.exitcode for _, f in sorted(exc.failures.items())]
            code = next((c for c in codes if c not in (0, None) and c > 0), None)
            if code is None:  # every failed rank died of a signal: Ctrl-C reached them first, else a crash (killed)
                if any(c in (-signal.SIGINT, -signal.SIGTERM) for c in codes):
                    raise KeyboardInterrupt from None
                import sys

                for r, f in sorted(exc.failures.items()):  # torchrun's own log is off: say which rank died and how
                    try:
                        how = signal.Signals(-f.exitcode).name
                    except (TypeError, ValueError):
                        how = f"status {f.exitcode}"
                    print(f"rank {r} was killed by {how}" + (" (out of memory?)" if how == "SIGKILL" else ""), file=sys.stderr)
                return 1
            if code == 130:
                raise KeyboardInterrupt from None
            if code == 2:
                from toolchain.errors import ToolchainError

                messages = sorted(Path(reports).glob("rank*.txt"), key=lambda p: int(p.stem[4:]))
                text = messages[0].read_text(encoding="utf-8").strip() if messages else ""
                raise ToolchainError(text or "a process exited with a user error (status 2); run with --verbose for details") from None
            crashes = sorted(Path(reports).glob("crash*.txt"), key=lambda p: int(p.stem[5:]))
            if crashes:  # a bug: one traceback (rank 0's, else the first rank's that crashed), exit 1
                import sys

                text = crashes[0].read_text(encoding="utf-8")
                print(f"{crashes[0].stem.replace('crash', 'rank ')} crashed:\n{text}", end="" if text.endswith("\n") else "\n",
                      file=sys.stderr)
            return code
        finally:
            os.environ.pop(REPORT_DIR_ENV, None)
    return 0
