"""Forward + backward of a training step captured once in a CUDA graph and replayed.

Why: a quantized SD-2.1 training step is launch-bound, not arithmetic-bound. Every quantized
layer issues dozens of small kernels (balancing transform, activation fake quantization, the
tied residual W − L1·L2 and its dynamic min-max grid, the low-rank branch) in forward and
backward — ≈ 50 k kernels per step on the ``osdface`` preset, whose GPU time is a fraction of the
CPU time spent issuing them (``benchmarks/results/recipe_speed``). A CUDA graph records the
kernels of one step once and replays them with one launch, so the step costs its GPU time.

What may run inside: anything without a host synchronisation (no ``.item()``, no ``float(t)``,
no data-dependent shapes) and with the same shapes every step. Loss functions return their
logged terms as tensors; they are read after the replay. The optimizer, gradient clipping,
gradient all-reduce and the learning-rate schedule stay outside the graph (eager), so they work
unchanged. Gradients live in static ``.grad`` buffers that the graph zeroes and backward
accumulates into in place; the eager optimizer reads them.

Reference: PyTorch "CUDA Graphs" notes, whole-network capture (warm-up on a side stream, then
``torch.cuda.graph``); autocast's weight-cast cache is disabled inside the capture, as advised there.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

LossFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]


class GraphedStep:
    """``step(*inputs)`` = zero the grads of ``params``, ``loss, logs = loss_fn(*inputs)``,
    ``loss.backward()`` — eagerly for ``warmup`` calls, then captured once and replayed.

    params: the trainable tensors; after the capture their ``.grad`` tensors are static buffers,
    zeroed and accumulated into in place by every call (do not set them to None: no
    ``optimizer.zero_grad(set_to_none=True)`` between calls). loss_fn: takes the input tensors,
    returns (scalar loss, dict of scalar tensors) and must not synchronise with the host. inputs:
    CUDA tensors; a call whose shapes/dtypes differ from the captured ones (e.g. a smaller last
    batch) runs eagerly into the same gradient buffers. amp_dtype: autocast dtype inside the step
    (None = off). Returns (loss, logs) as tensors that the next call overwrites.
    """

    def __init__(self, params: Sequence[torch.Tensor], loss_fn: LossFn, amp_dtype: torch.dtype | None = None, warmup: int = 2):
        self.params = list(params)
        self.loss_fn = loss_fn
        self.amp_dtype = amp_dtype
        self.warmup = max(1, warmup)
        self.calls = 0
        self.replays = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: tuple[torch.Tensor, ...] = ()
        self.static_out: tuple[torch.Tensor, dict[str, Any]] | None = None
        self._stream: torch.cuda.Stream | None = None

    def _run(self, inputs: Sequence[torch.Tensor], cache: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)  # backward then accumulates in place (grad mode off in the engine)
        with torch.autocast("cuda", dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None, cache_enabled=cache):
            loss, logs = self.loss_fn(*inputs)
        loss.backward()
        return loss, logs

    def _matches(self, inputs: Sequence[torch.Tensor]) -> bool:
        return len(inputs) == len(self.static_inputs) and all(
            a.shape == b.shape and a.dtype == b.dtype for a, b in zip(inputs, self.static_inputs))

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.graph is not None:
            if not self._matches(inputs):
                return self._run(inputs, cache=True)
            for dst, src in zip(self.static_inputs, inputs):
                dst.copy_(src, non_blocking=True)
            self.graph.replay()
            self.replays += 1
            return self.static_out  # type: ignore[return-value]
        self.calls += 1
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        if self.calls <= self.warmup:
            # warm-up on a side stream (cuDNN/cuBLAS workspaces, lazy inits, one-time host state)
            with torch.cuda.stream(self._stream):
                out = self._run(inputs, cache=True)
            torch.cuda.current_stream().wait_stream(self._stream)
            return out
        self.static_inputs = tuple(t.detach().clone() for t in inputs)
        for p in self.params:  # static gradient buffers outside the graph's pool
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self._stream):
            self.static_out = self._run(self.static_inputs, cache=False)
        torch.cuda.current_stream().wait_stream(self._stream)
        self.graph.replay()  # capture records, it does not run: run this call's step now
        self.replays += 1
        return self.static_out
