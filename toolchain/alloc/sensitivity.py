"""Per-layer activation sensitivity (QuantFace §3.3, the paper's Fig. 5).

For each activation-quantized layer alone (every other quantizer off), the activation bits are
raised from ``start_bits`` until the chosen quality metric is within ε of full precision (or
``max_bits``): that is B_i, and w_i = 2^B_i − 1 weights the layer's error in the integer program.

Metrics (``--metric``; ``auto`` picks the first whose weights are present):
  fid       |FID(I_q, HQ) − FID(I_fp, HQ)|, Inception-v3 weights in --weights-dir
  lpips     LPIPS-Alex(I_q, I_fp), AlexNet weights in --weights-dir
  st_lpips  shift-tolerant LPIPS(I_q, I_fp) — weights ship in a wheel, so always available (fallback)
  mse       mean squared error (I_q vs I_fp, images in [0, 1]) — choose ε accordingly

Results are cached one JSON file per layer under ``<out>/sensitivity/``; a rerun skips finished
layers, and ``workers > 1`` splits the layers across processes (one GPU each where available).
Under torchrun (``toolchain.distributed``) the layers still to do are split across the ranks
instead (rank r takes every world-th one, on ``cuda:LOCAL_RANK`` with CUDA); each rank writes its
layers' cache files and the results are gathered on every rank with ``all_gather_object``; rank 0
alone clears a stale cache and writes ``sensitivity.json``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from toolchain import distributed as D
from toolchain.alloc.common import activation_layers, quantizer_at_bits, swapped_input_quantizer
from toolchain.errors import ConfigError, MissingWeightsError
from toolchain.io.atomic import atomic_write_json

METRICS = ("auto", "fid", "lpips", "st_lpips", "mse")


@dataclass
class SweepSettings:
    metric: str = "auto"
    epsilon: float = 0.02
    start_bits: int = 2
    max_bits: int = 8
    images: int = 8
    batch_size: int = 4
    weights_dir: str | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"unknown sensitivity metric '{self.metric}' ({', '.join(METRICS)})")
        if not 2 <= self.start_bits <= self.max_bits <= 16:
            raise ConfigError("need 2 <= start_bits <= max_bits <= 16")


def resolve_metric(settings: SweepSettings, n_images: int) -> str:
    from toolchain.eval import metrics as M

    if settings.metric != "auto":
        if settings.metric == "lpips":
            M.make_lpips(settings.weights_dir)
        if settings.metric == "fid":
            M._require(settings.weights_dir, M.INCEPTION_FILE, "fid")
        return settings.metric
    for name in ("fid", "lpips"):
        try:
            if name == "fid":
                M._require(settings.weights_dir, M.INCEPTION_FILE, "fid")
                if n_images < 16:
                    continue
            else:
                M.make_lpips(settings.weights_dir)
            return name
        except MissingWeightsError:
            continue
    return "st_lpips"


def metric_fn(name: str, weights_dir: str | None, fp_out: torch.Tensor, hq: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """Distance of a quantized output set from full precision (0 = identical quality)."""
    from toolchain.eval import metrics as M

    if name == "st_lpips":
        return lambda out: float(M.st_lpips(out, fp_out).mean())
    if name == "lpips":
        fn = M.make_lpips(weights_dir)
        return lambda out: float(fn(out, fp_out).mean())
    if name == "mse":
        return lambda out: float((out - fp_out).pow(2).mean())
    if name == "fid":
        base = M.set_metric("fid", fp_out, hq, weights_dir)
        return lambda out: abs(M.set_metric("fid", out, hq, weights_dir) - base)
    raise ConfigError(f"unknown metric {name}")


def _restore(model, batches: list[torch.Tensor], device) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([((model(b.to(device)).float() + 1) / 2).clamp(0, 1).cpu() for b in batches])


@torch.no_grad()
def sweep_layers(ckpt: Path, calib: Path, names: list[str], settings: SweepSettings, cache: Path, device: str, progress: bool = True) -> None:
    """Compute B_i for ``names`` (skipping cached ones); writes ``cache/<layer>.json``."""
    from toolchain.calibration.dataset import CalibrationSet
    from toolchain.quant.calibrate import quantizers_off
    from toolchain.quant.checkpoint import load_quantized

    model, _ = load_quantized(ckpt, device)
    data = CalibrationSet.open(calib)
    batches = data.batches(model.image_size, settings.batch_size, limit=settings.images)
    upscale = getattr(model.config, "upscale", 1)
    data.check_for(upscale)
    hq = (torch.cat(data.batches(model.image_size * upscale, settings.batch_size, limit=settings.images, which="hq")) + 1) / 2
    layers = activation_layers(model)
    todo = [n for n in names if not (cache / f"{n}.json").is_file()]
    if not todo:
        return
    with quantizers_off(model):
        fp_out = _restore(model, batches, device)
        metric = resolve_metric(settings, len(hq))
        dist = metric_fn(metric, settings.weights_dir, fp_out, hq)
        for name in tqdm(todo, desc="sensitivity", disable=not progress, leave=False):
            layer = layers[name]
            trials: dict[str, float] = {}
            chosen = settings.max_bits
            for bits in range(settings.start_bits, settings.max_bits + 1):
                with swapped_input_quantizer(layer, quantizer_at_bits(layer.input_quantizer, bits)):
                    d = dist(_restore(model, batches, device))
                trials[str(bits)] = d
                if d <= settings.epsilon:
                    chosen = bits
                    break
            atomic_write_json(cache / f"{name}.json", {"layer": name, "metric": metric, "epsilon": settings.epsilon,
                                                       "trials": trials, "B": chosen, "w": 2**chosen - 1})


def _fingerprint(ckpt: Path, calib: Path, settings: SweepSettings) -> str:
    h = hashlib.sha256()
    h.update((ckpt / "model.safetensors").read_bytes()[:1 << 20])
    h.update((ckpt / "quant_config.json").read_bytes())
    h.update((calib / "manifest.json").read_bytes())
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _worker(args) -> None:
    ckpt, calib, names, settings, cache, device, threads = args
    torch.set_num_threads(threads)  # share the cores instead of oversubscribing them
    sweep_layers(Path(ckpt), Path(calib), names, settings, Path(cache), device, progress=False)


def run_sensitivity(ckpt: Path, calib: Path, out: Path, settings: SweepSettings, workers: int = 1, device: str = "cpu") -> dict:
    """Sweep every activation layer (resumable, optionally in parallel); returns {layer: result}.

    ``workers > 1`` uses a local process pool; under torchrun the ranks share the layers instead (see
    the module docstring) and every rank returns the whole result."""
    from toolchain.quant.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(ckpt)
    names = [n for n, d in meta["layers"].items() if d.get("a_bits")]
    cache = out / "sensitivity"
    t0 = time.perf_counter()
    if D.is_main():
        cache.mkdir(parents=True, exist_ok=True)
        fp = _fingerprint(ckpt, calib, settings)
        stamp = cache / "_settings.json"
        if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") != fp:
            for f in cache.glob("*.json"):
                f.unlink()  # different checkpoint, data or settings: cached results do not apply
        atomic_write_json(stamp, {"fingerprint": fp, "settings": asdict(settings), "checkpoint": str(ckpt), "calib": str(calib)})
    if D.active():
        return _run_sharded(ckpt, calib, out, names, settings, cache, device, t0)
    if workers <= 1:
        sweep_layers(ckpt, calib, names, settings, cache, device)
    else:
        n_gpu = torch.cuda.device_count() if device.startswith("cuda") else 0
        shards = [names[k::workers] for k in range(workers)]
        threads = max(1, (os.cpu_count() or 1) // workers)
        jobs = [(str(ckpt), str(calib), shard, settings, str(cache), f"cuda:{k % n_gpu}" if n_gpu else "cpu", threads)
                for k, shard in enumerate(shards)]
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            result = pool.map_async(_worker, jobs)
            with tqdm(total=len(names), desc=f"sensitivity ({workers} workers)") as bar:
                while not result.ready():
                    result.wait(1.0)
                    bar.n = sum(1 for n in names if (cache / f"{n}.json").is_file())
                    bar.refresh()
            result.get()
    results = {n: json.loads((cache / f"{n}.json").read_text()) for n in names}
    _write_summary(out, settings, results, t0)
    return results


def _run_sharded(ckpt: Path, calib: Path, out: Path, names: list[str], settings: SweepSettings, cache: Path, device: str,
                 t0: float) -> dict:
    """The sweep under torchrun: rank 0 lists the layers still to do, each rank sweeps its share, all gather."""
    todo = D.broadcast_object([n for n in names if not (cache / f"{n}.json").is_file()] if D.is_main() else None)
    mine = todo[D.rank()::D.world_size()]
    if mine:
        sweep_layers(ckpt, calib, mine, settings, cache, device, progress=D.is_main())
    local = {n: json.loads((cache / f"{n}.json").read_text()) for n in mine}
    results: dict = {}
    for part in D.all_gather(local):
        results.update(part)
    if D.is_main():
        for n in names:
            if n not in results:  # done by an earlier run
                results[n] = json.loads((cache / f"{n}.json").read_text())
    results = D.broadcast_object({n: results[n] for n in names} if D.is_main() else None)
    if D.is_main():
        _write_summary(out, settings, results, t0)
    D.barrier()
    return results


def _write_summary(out: Path, settings: SweepSettings, results: dict, t0: float) -> None:
    atomic_write_json(out / "sensitivity.json", {"settings": asdict(settings), "seconds_this_run": round(time.perf_counter() - t0, 1),
                                                 "metric": next(iter(results.values()))["metric"] if results else None, "layers": results})
