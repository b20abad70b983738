"""QD-LoRA training-step speed and memory vs a plain training step of the same float model, in one run.

For each preset: a plain bf16 step (every weight trainable, AdamW, autocast bf16) and the QuantFace
QD-LoRA step (W4A4, rotation-scaling balancing, tied SVD + LoRA branches of rank 8, dynamic weight
scales, Adam over the branches, autocast bf16) with the **reference** fake-quant formulation and with
the **fast** path (toolchain/quant/quantizer.py), all on the same random-init model and the same
batch. Loss: MSE against the float model's output for every step kind (the perceptual term would add
the same cost to each). Times are medians over timed steps after warm-up, with CUDA synchronised;
a torch.profiler top-10 (CUDA and CPU time) per step kind goes beside the results.

    python benchmarks/recipe_speed.py --presets osdface:1,ref:4 --steps 8 --out benchmarks/results/recipe_speed
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import toolchain  # noqa: E402,F401
from benchmarks.common import command_line, environment  # noqa: E402
from toolchain.balance.transform import BalanceConfig  # noqa: E402
from toolchain.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from toolchain.lowrank.compensate import _branch_params, attach_branches, follow_trained_weights  # noqa: E402
from toolchain.methods.balanced import balance_model  # noqa: E402
from toolchain.quant.registry import MethodContext  # noqa: E402
from toolchain.models import build_model, preset  # noqa: E402
from toolchain.quant import quantizer as Q  # noqa: E402
from toolchain.quant.calibrate import calibrate_activations, calibrate_weights, prepare_model  # noqa: E402
from toolchain.quant.config import QuantConfig  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(step, n_warm: int, n: int, dev: torch.device) -> dict:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(n_warm):
        step()
    _sync(dev)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t)
    res = {"median_s": float(np.median(times)), "min_s": float(np.min(times)), "steps": n}
    if dev.type == "cuda":
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return res


def profile_top(step, dev: torch.device, n: int = 3) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        _sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return (prof.key_averages().table(sort_by=key, row_limit=10) + "\n" +
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def _trainable(params) -> list[torch.nn.Parameter]:
    params = list(params)
    for p in params:
        p.requires_grad_(True)
    return params


def _mse(model):
    """The step's loss: MSE of the model's output against the float model's (logged terms: none)."""
    return lambda xi, ti: (F.mse_loss(model(xi).float(), ti), {})


def _eager_step_fn(model, opt, x, target, dev, check_finite: bool):
    """One eager step; ``check_finite`` reads the loss on the host (a device sync) as the trainer does for QD-LoRA,
    so the plain step (a baseline with no such check) is not slowed by it."""
    loss_fn = _mse(model)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss, _ = loss_fn(x, target)
        if check_finite and not torch.isfinite(loss):
            raise FloatingPointError("loss is not finite")
        loss.backward()
        opt.step()
    return step


def plain_step_fn(model, x, target, dev):
    """Every weight trainable, AdamW."""
    params = _trainable(model.parameters())
    return _eager_step_fn(model, torch.optim.AdamW(params, lr=1e-6), x, target, dev, check_finite=False)


def qdlora_model(model, x, dev, rank: int):
    cfg = QuantConfig.for_bits("quantface", "w4a4")
    prepare_model(model, cfg)
    ctx = MethodContext(lq_batches=[x[:1].cpu()], device=dev, seed=0)
    balance_model(model, ctx, BalanceConfig(mode="rotate-scale", seed=0))
    attach_branches(model, rank, rank, 0)
    calibrate_weights(model)
    calibrate_activations(model, [x[:1]])
    for p in model.parameters():
        p.requires_grad_(False)
    follow_trained_weights(model)  # as train_branches does (every weight-quantized layer has a branch here)
    return model


def qdlora_step_fn(model, x, target, dev):
    """The branches trainable, Adam, eager."""
    params = _trainable(_branch_params(model).values())
    return _eager_step_fn(model, torch.optim.Adam(params, lr=1e-5), x, target, dev, check_finite=True)


def qdlora_graph_step_fn(model, x, target, dev):
    """The fast step with forward + backward captured in a CUDA graph (toolchain/train/graphs.py); Adam stays eager."""
    from toolchain.train.graphs import GraphedStep

    params = _trainable(_branch_params(model).values())
    opt = torch.optim.Adam(params, lr=1e-5)
    graphed = GraphedStep(params, _mse(model), torch.bfloat16, warmup=2)

    def step():
        graphed(x, target)
        opt.step()
    return step


def graph_parity(model, x, target, dev) -> dict:
    """Loss and branch gradients of one replayed CUDA-graph step vs the same step run eagerly (no optimizer step)."""
    from toolchain.train.graphs import GraphedStep

    params = _trainable(_branch_params(model).values())
    graphed = GraphedStep(params, _mse(model), torch.bfloat16, warmup=1)
    graphed(x, target)
    loss_g = graphed(x, target)[0].detach().clone()
    grads_g = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        loss_e, _ = _mse(model)(x, target)
    loss_e.backward()
    num = max(float((a - p.grad).abs().max()) for a, p in zip(grads_g, params))
    den = max(float(p.grad.abs().max()) for p in params)
    for p in params:
        p.grad = None
    return {"loss_graph": float(loss_g), "loss_eager": float(loss_e), "grad_max_abs_diff": num, "grad_max_abs": den,
            "grad_max_rel_diff": num / max(den, 1e-30)}


def run_preset(name: str, batch: int, args, dev: torch.device, out: Path) -> dict:
    cfg = preset(name)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1).to(dev)
    fp = build_model(cfg, seed=0).to(dev)
    with torch.no_grad():
        target = fp(x).float()
    row: dict = {"preset": name, "image_size": cfg.image_size, "batch": batch, "params_M": round(sum(p.numel() for p in fp.parameters()) / 1e6, 1)}
    q = qdlora_model(copy.deepcopy(fp), x, dev, args.rank)
    plain = plain_step_fn(fp, x, target, dev)
    row["plain"] = timed_steps(plain, args.warmup, args.steps, dev)
    (out / f"profile_{name}_plain.txt").write_text(profile_top(plain, dev))
    del plain, fp
    gc.collect()
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    impls = [i for i in args.impls.split(",") if i != "graph" or dev.type == "cuda"]
    if "graph" in impls:
        row["graph_parity"] = graph_parity(q, x, target, dev)
        print(name, "graph parity", row["graph_parity"], flush=True)
    for impl in impls:
        Q.REFERENCE_PATH = impl == "reference"
        step = (qdlora_graph_step_fn if impl == "graph" else qdlora_step_fn)(q, x, target, dev)
        row[f"qdlora_{impl}"] = timed_steps(step, args.warmup, args.steps, dev)
        (out / f"profile_{name}_qdlora_{impl}.txt").write_text(profile_top(step, dev))
        print(name, impl, row[f"qdlora_{impl}"], flush=True)
    Q.REFERENCE_PATH = False
    for k in impls:
        row[f"qdlora_{k}_over_plain"] = row[f"qdlora_{k}"]["median_s"] / row["plain"]["median_s"]
    best_impl = "graph" if "graph" in impls else "fast"
    row["best_impl"] = best_impl
    row["fast_images_per_s"] = batch / row[f"qdlora_{best_impl}"]["median_s"]
    if args.batch_sweep and name == args.batch_sweep:
        sweep = {}
        for b in (1, 2, 4, 8):
            try:
                xb = x[:1].repeat(b, 1, 1, 1)
                tb = target[:1].repeat(b, 1, 1, 1)
                fn = qdlora_graph_step_fn if best_impl == "graph" else qdlora_step_fn
                r = timed_steps(fn(q, xb, tb, dev), 2 if best_impl == "graph" else 1, max(3, args.steps // 2), dev)
                sweep[b] = {"images_per_s": b / r["median_s"], **r}
                print(name, "batch", b, sweep[b], flush=True)
            except torch.OutOfMemoryError:
                sweep[b] = "out of memory"
                break
        row["batch_sweep"] = sweep
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="osdface:1,ref:4", help="preset:batch pairs")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--impls", default="reference,fast,graph", help="QD-LoRA step variants: reference, fast, graph (CUDA graph, GPU only)")
    ap.add_argument("--batch-sweep", default="osdface", help="preset whose fast step is timed at batch 1, 2, 4, 8")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for item in args.presets.split(","):
        name, batch = item.split(":")
        rows[name] = run_preset(name, int(batch), args, dev, args.out)
        atomic_write_json(args.out / "rows.json", rows)
    o, r = rows.get("osdface"), rows.get("ref")
    best = None
    if o and isinstance(o.get("batch_sweep"), dict):
        ok = {b: v for b, v in o["batch_sweep"].items() if isinstance(v, dict)}
        best = max(ok.items(), key=lambda kv: kv[1]["images_per_s"]) if ok else None
    results = {
        "osdface_qdlora_over_plain_step": o[f"qdlora_{o['best_impl']}_over_plain"] if o else None,
        "osdface_qdlora_peak_gib": o[f"qdlora_{o['best_impl']}"].get("peak_gib") if o else None,
        "ref_qdlora_over_plain_step": r[f"qdlora_{r['best_impl']}_over_plain"] if r else None,
        "ddp_2gpu_speedup": None, "recipe_512_minutes": None, "recipe_512_peak_gib": None,
        "osdface_qdlora_reference_over_plain_step": o.get("qdlora_reference_over_plain") if o else None,
        "ref_qdlora_reference_over_plain_step": r.get("qdlora_reference_over_plain") if r else None,
        "osdface_best_batch": {"batch": best[0], **best[1]} if best else None,
        "command": command_line(), "environment": environment(), "rows": rows,
    }
    atomic_write_json(args.out / "results.json", results)
    lines = ["# QD-LoRA step vs plain training step (same model, same batch, one run)\n", f"Command: `{results['command']}`  ",
             f"Device: {results['environment'].get('gpu') or results['environment'].get('cpu')}\n",
             "| preset | px | batch | step | ms (median) | peak GiB | / plain |", "|---|---|---|---|---|---|---|"]
    for n, w in rows.items():
        for k in ["plain"] + [i for i in ("reference", "fast", "graph") if f"qdlora_{i}" in w]:
            key = k if k == "plain" else f"qdlora_{k}"
            ratio = "1" if k == "plain" else f"{w[key + '_over_plain']:.2f}"
            lines.append(f"| {n} | {w['image_size']} | {w['batch']} | {k if k == 'plain' else 'QD-LoRA ' + k} | "
                         f"{w[key]['median_s'] * 1000:.0f} | {w[key].get('peak_gib', '–')} | {ratio} |")
    if best:
        lines.append(f"\nBest batch for the fast QD-LoRA step on osdface: {best[0]} → {best[1]['images_per_s']:.2f} images/s "
                     f"(peak {best[1].get('peak_gib', '–')} GiB).")
    atomic_write_text(args.out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
