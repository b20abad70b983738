"""A small, resumable training loop shared by every trained stage.

Why its own loop: each stage (reference model, QD-LoRA, PassionSR, EfficientDM, ...) needs the
same guarantees — deterministic under a seed, periodic checkpoints written atomically, exact
resume after an interruption (same subsequent losses), progress with the loss, a loss-curve
PNG, mixed precision on GPU — and nothing else.

Determinism across resume: the batch of step ``s`` must be a pure function of ``s`` (the
``batch_fn`` contract), and the RNG states are saved with the checkpoint.

Data parallelism (under ``torchrun``, see ``toolchain.distributed``): with ``shardable=True`` each
rank takes its rows of the global batch (``shard_rows``: the global batch is the 1-process batch),
computes the loss on them, weights it by its share of the samples and the gradients are summed
over the ranks — for a loss that is a mean over samples that is exactly the 1-process gradient,
uneven shards included. Without ``shardable`` every rank computes the whole batch and gradients
are averaged (correct, no speed-up). Rank 0 alone writes checkpoints, ``history.json`` and shows
progress; on resume it reads the checkpoint and broadcasts it, so every rank continues from the
same state. Nothing of this runs in a single process.

Validation-based stopping (``eval_every``/``patience``/``min_delta`` with a ``validate`` callable,
higher scores better): rank 0 scores the model every ``eval_every`` steps, keeps a CPU copy of the
best parameters in the checkpoint, and the run stops when ``patience`` scores in a row did not beat
the best by more than ``min_delta``; ``restore_best()`` puts the best parameters back. Scores and
the best step survive an interruption (``val_history.json``), so a resumed run stops where an
uninterrupted one would.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from toolchain import distributed as D
from toolchain.errors import CheckpointError, ConfigError
from toolchain.io.atomic import atomic_write_bytes, atomic_write_json


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 1e-5
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50
    grad_clip: float | None = 1.0
    amp: str = "auto"  # auto (bf16 on CUDA), bf16, fp16, off
    lr_schedule: str = "constant"  # constant | cosine | step (×0.2 at milestones)
    milestones: tuple[int, ...] = ()
    warmup: int = 0
    max_seconds: float | None = None  # stop early (checkpointed) when the wall-clock budget is spent
    # validation-based stopping (needs ``validate``): score every ``eval_every`` steps (0: never); stop when
    # ``patience`` scores in a row have not beaten the best by more than ``min_delta`` (0: never stop on it)
    eval_every: int = 0
    patience: int = 0
    min_delta: float = 0.0
    # auto: capture forward+backward in a CUDA graph on CUDA for losses marked graphable; on | off
    # (default from the environment variable TOOLCHAIN_CUDA_GRAPH, e.g. =off to debug a step eagerly)
    cuda_graph: str = field(default_factory=lambda: os.environ.get("TOOLCHAIN_CUDA_GRAPH", "auto"))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain lists (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_rest": [int(pos), int(has_gauss), float(cached)], "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Optimise ``params`` to minimise ``loss_fn(step, batch_fn(step))``.

    ``loss_fn`` returns (loss tensor, dict of floats to log). ``state`` names the tensors to
    checkpoint (usually the trainable parameters plus any buffers they depend on).

    ``shardable``: ``batch_fn(step)`` returns a tensor or a tuple/list of tensors whose first
    dimension is the sample axis (all of one length), and the loss is a mean over samples; under
    torchrun each rank then passes only its rows to ``loss_fn`` (a rank with no rows contributes
    nothing). Entries that are not tensors are passed to every rank as they are. Raises ValueError when the tensors of a batch disagree on the number of samples.
    """

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        loss_fn: Callable[[int, Any], tuple[torch.Tensor, dict[str, float]]],
        batch_fn: Callable[[int], Any],
        workdir: str | Path,
        config: TrainConfig,
        device: torch.device | str = "cpu",
        desc: str = "training",
        param_groups: list[dict[str, Any]] | None = None,
        shardable: bool = False,
        graphable: bool = False,
        validate: Callable[[], float] | None = None,
    ):
        self.params = params
        self.loss_fn = loss_fn
        self.batch_fn = batch_fn
        self.workdir = Path(workdir)
        self.cfg = config
        self.device = torch.device(device)
        self.desc = desc
        self.shardable = shardable
        groups = param_groups or [{"params": list(params.values())}]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay) if config.weight_decay else torch.optim.Adam(groups, lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.history: list[dict[str, float]] = []
        self.step = 0
        # validation: ``validate()`` returns a score (higher is better, e.g. held-out PSNR in dB), run on rank 0
        self.validate = validate
        if config.eval_every and validate is None:
            raise ConfigError("eval_every needs a validate function")
        self.val_history: list[dict[str, float]] = []
        self.best: dict[str, Any] | None = None  # {"step", "score", "params" (CPU copies)}
        self.stopped_early = False
        amp = config.amp
        if amp == "auto":
            amp = "bf16" if self.device.type == "cuda" else "off"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        if config.cuda_graph not in ("auto", "on", "off"):
            raise ConfigError(f"cuda_graph must be auto, on or off (TOOLCHAIN_CUDA_GRAPH), got {config.cuda_graph!r}")
        # CUDA graph (toolchain/train/graphs.py): for a graphable loss — batch_fn(step) gives a tuple of
        # tensors, loss_fn(step, batch) ignores ``step``, never syncs with the host and logs tensors
        self.graphed = None
        use_graph = config.cuda_graph == "on" or (config.cuda_graph == "auto" and self.device.type == "cuda")
        if graphable and use_graph and self.scaler is None:
            if self.device.type != "cuda":
                raise ConfigError("cuda_graph=on (TOOLCHAIN_CUDA_GRAPH) needs a CUDA device")
            from toolchain.train.graphs import GraphedStep

            self.graphed = GraphedStep(list(params.values()), lambda *batch: self.loss_fn(-1, batch), self.amp_dtype)

    def _lr_factor(self, step: int) -> float:
        f = 1.0
        if self.cfg.warmup and step < self.cfg.warmup:
            f = (step + 1) / self.cfg.warmup
        if self.cfg.lr_schedule == "cosine":
            f *= 0.5 * (1 + math.cos(math.pi * min(step, self.cfg.steps) / max(1, self.cfg.steps)))
        elif self.cfg.lr_schedule == "step":
            f *= 0.2 ** sum(step >= m for m in self.cfg.milestones)
        return f

    # -- checkpoints -----------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.workdir / "trainer_state.pt"

    def save(self) -> None:
        """Write the checkpoint and ``history.json`` atomically (rank 0 only; a no-op on other ranks)."""
        if not D.is_main():
            return
        state = {
            "step": self.step,
            "params": {k: v.detach().cpu() for k, v in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": json.dumps(self.history),
            "rng": _rng_state(),
            "config": json.dumps(self.cfg.to_dict()),
            "val_history": json.dumps(self.val_history),
            "stopped_early": self.stopped_early,
        }
        if self.best is not None:
            state["best_step"], state["best_score"] = int(self.best["step"]), float(self.best["score"])
            state["best_params"] = self.best["params"]
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.ckpt_path, buf.getvalue())
        atomic_write_json(self.workdir / "history.json", self.history)
        if self.val_history:
            atomic_write_json(self.workdir / "val_history.json", self.val_history)

    def _load_state(self) -> dict[str, Any] | None:
        if not self.ckpt_path.is_file():
            return None
        try:
            return torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt state file must not be silently ignored
            raise CheckpointError(f"cannot resume from {self.ckpt_path}: {str(exc).splitlines()[0][:200]}; delete it to start over") from None

    def try_resume(self) -> bool:
        """Load the checkpoint if there is one (under torchrun: rank 0's, broadcast to every rank)."""
        if D.active():
            err, state = None, None
            if D.is_main():
                try:
                    state = self._load_state()
                except CheckpointError as exc:
                    err = str(exc)
            err, state = D.broadcast_object((err, state))
            if err is not None:
                raise CheckpointError(err)
        else:
            state = self._load_state()
        if state is None:
            return False
        if set(state["params"]) != set(self.params) or any(v.shape != self.params[k].shape for k, v in state["params"].items()):
            raise CheckpointError(f"{self.ckpt_path} was written for different trainable parameters; delete it to start over")
        with torch.no_grad():
            for k, v in state["params"].items():
                self.params[k].copy_(v.to(self.params[k]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = json.loads(state["history"])
        self.step = int(state["step"])
        self.val_history = json.loads(state.get("val_history", "[]"))
        self.stopped_early = bool(state.get("stopped_early", False))
        if "best_params" in state:
            self.best = {"step": int(state["best_step"]), "score": float(state["best_score"]), "params": state["best_params"]}
        _set_rng_state(state["rng"])
        return True

    # -- validation ----------------------------------------------------------------------------
    def _plateaued(self) -> bool:
        """Score the model (rank 0), keep the best parameters, and say whether to stop (same answer on every rank)."""
        stop = False
        if D.is_main():
            score = float(self.validate())
            if not math.isfinite(score):
                raise FloatingPointError(f"{self.desc}: validation score is {score} at step {self.step}")
            self.val_history.append({"step": self.step, "score": score})
            if self.best is None or score > self.best["score"] + self.cfg.min_delta:
                self.best = {"step": self.step, "score": score, "params": {k: v.detach().cpu().clone() for k, v in self.params.items()}}
            since = sum(1 for v in self.val_history if v["step"] > self.best["step"])
            stop = bool(self.cfg.patience) and since >= self.cfg.patience
            tqdm.write(f"{self.desc}: step {self.step} validation {score:.4f} (best {self.best['score']:.4f} at step {self.best['step']})")
        return bool(D.broadcast_object(stop)) if D.active() else stop

    def restore_best(self) -> int | None:
        """Copy the best-validated parameters back into the model (rank 0's, to every rank); returns that step."""
        best = D.broadcast_object(self.best) if D.active() else self.best
        if best is None:
            return None
        with torch.no_grad():
            for k, v in best["params"].items():
                self.params[k].copy_(v.to(self.params[k]))
        return int(best["step"])

    # -- loop --------------------------------------------------------------------------------
    def run(self) -> list[dict[str, float]]:
        main = D.is_main()
        if main:
            self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.try_resume():
            seed_everything(self.cfg.seed)
        elif main:
            tqdm.write(f"{self.desc}: resuming at step {self.step}/{self.cfg.steps} from {self.ckpt_path}")
        if D.active():
            D.broadcast_tensors(self.params.values())  # one starting point, whatever each rank computed before
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=self.desc, leave=False, disable=not main)
        t0 = time.perf_counter()
        while self.step < self.cfg.steps and not self.stopped_early:  # (a resumed run that had plateaued is done)
            batch = self.batch_fn(self.step)
            if self.graphed is None:
                self.optimizer.zero_grad(set_to_none=True)  # (a graphed step zeroes its static grads itself)
            if D.active():
                loss, logs, stop = self._distributed_step(batch, t0)
            elif self.graphed is not None:  # zero grads + forward + backward, replayed
                loss, logs = self.graphed(*(t.to(self.device, non_blocking=True) for t in batch))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{self.desc}: loss is {loss.item()} at step {self.step}")
                stop = None
            else:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss, logs = self.loss_fn(self.step, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{self.desc}: loss is {loss.item()} at step {self.step}")
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.unscale_(self.optimizer)
                else:
                    loss.backward()
                stop = None
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in self.params.values() if p.grad is not None], self.cfg.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            record = {"step": self.step, "loss": float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss),
                      **{k: float(v) for k, v in logs.items()}, "lr": self.scheduler.get_last_lr()[0]}
            self.history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4g}")
            bar.update(1)
            out_of_time = stop if stop is not None else (self.cfg.max_seconds is not None and time.perf_counter() - t0 > self.cfg.max_seconds)
            # also when the wall clock stops the run between two validations: its last weights may be the best
            # (a ref-l run stopped at step 1997 of 2000 kept step 1600's weights before this)
            scored = bool(self.cfg.eval_every) and (self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps or out_of_time)
            plateau = scored and self._plateaued()
            self.stopped_early = plateau  # (saved below: a rerun of a plateaued workdir trains no further)
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps or out_of_time or scored:
                self.save()  # (after each validation too, so a resumed run never scores a step twice)
            if plateau:
                if main:
                    tqdm.write(f"{self.desc}: no validation gain over {self.cfg.min_delta} in {self.cfg.patience} evaluations, stopping at step {self.step}")
                break
            if out_of_time:
                if main:
                    tqdm.write(f"{self.desc}: wall-clock budget of {self.cfg.max_seconds:.0f} s spent, stopping at step {self.step}")
                break
        bar.close()
        D.barrier()  # the last checkpoint is on disk before any rank goes on
        self.elapsed = time.perf_counter() - t0
        return self.history

    def _distributed_step(self, batch: Any, t0: float) -> tuple[float, dict[str, float], bool]:
        """Forward/backward of this rank's share, gradients summed over ranks; returns the global loss,
        the global logged terms and whether to stop (rank 0's wall clock decides, for every rank)."""
        world = D.world_size()
        if self.shardable:
            tensors = list(batch) if isinstance(batch, (tuple, list)) else [batch]
            sizes = {int(t.shape[0]) for t in tensors if isinstance(t, torch.Tensor)}
            if len(sizes) != 1:
                raise ValueError(f"{self.desc}: a shardable batch needs tensors with one common first dimension, got sizes {sorted(sizes)}")
            n = sizes.pop()
            rows = D.shard_rows(n)
            part = [t[rows] if isinstance(t, torch.Tensor) else t for t in tensors]
            local = type(batch)(part) if isinstance(batch, (tuple, list)) else part[0]
            weight, empty = (rows.stop - rows.start) / n, rows.stop == rows.start
        else:
            local, weight, empty = batch, 1.0 / world, False
        loss = None
        logs: dict[str, float] = {}
        if self.graphed is not None:
            if not empty:  # the graph's backward is unweighted: its gradients are weighted below
                loss, logs = self.graphed(*(t.to(self.device, non_blocking=True) for t in local))
            else:
                torch._foreach_zero_([p.grad for p in self.params.values() if p.grad is not None])
        elif not empty:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss, logs = self.loss_fn(self.step, local)
        share = (weight * float(loss.detach()) if loss is not None else 0.0, {k: weight * float(v) for k, v in logs.items()})
        out_of_time = D.is_main() and self.cfg.max_seconds is not None and time.perf_counter() - t0 > self.cfg.max_seconds
        gathered = D.all_gather((share, out_of_time))
        total = sum(g[0][0] for g in gathered)
        keys = [k for g in gathered for k in g[0][1]]
        merged = {k: sum(g[0][1].get(k, 0.0) for g in gathered) for k in dict.fromkeys(keys)}
        if not math.isfinite(total):  # every rank sees the same global value, so every rank stops together
            raise FloatingPointError(f"{self.desc}: loss is {total} at step {self.step}")
        if self.graphed is not None:
            grads = [p.grad for p in self.params.values() if p.grad is not None]
            if grads and weight != 1.0:
                torch._foreach_mul_(grads, weight)
        elif loss is not None:
            scaled = loss * weight
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        elif self.scaler is not None:
            self.scaler.scale(torch.zeros((), device=self.device))  # the scaler's state starts on its first use
        D.all_reduce_grads(self.params.values())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        return total, merged, bool(gathered[0][1])


def plot_loss_curve(history: list[dict[str, float]], path: str | Path, title: str = "training loss") -> Path:
    """Loss (and any other logged terms) against step, smoothed, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    keys = [k for k in history[0] if k not in ("step", "lr")] if history else []
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        vals = np.array([h.get(k, np.nan) for h in history], dtype=float)
        win = max(1, len(vals) // 50)
        smooth = np.convolve(vals, np.ones(win) / win, mode="valid") if len(vals) >= win else vals
        ax.plot(steps[win - 1 :], smooth, label=k, lw=1.5 if k == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
