"""Wall time, peak memory and throughput of the full QuantFace recipe per stage, with mixed precision.

Runs the same stages as `toolchain quantize --method quantface` (+ `allocate all` with `--mp`) one by
one, timing each, on a model of the chosen preset (random initialisation is enough for timing):
channel statistics + balancing, SVD/LoRA init, weight and activation calibration, [checkpoint,
sensitivity sweep, error table, integer program, per-layer activation bits applied], QD-LoRA
distillation (``--epochs`` passes over the calibration images, or ``--steps``), merge, save.
Calibration images are the bundled faces resized to the model size and degraded (cycled to --images).

    python benchmarks/quantface_recipe_timing.py --preset osdface --images 512 --epochs 1 --batch-size 4 --mp \
        --sweep-images 2 --out benchmarks/results/recipe_512        # issue: whole recipe at 512 images
    python benchmarks/quantface_recipe_timing.py --preset tiny --images 8 --epochs 1 --mp --mse-only --out /tmp/t   # CPU smoke
    # test: ~1 min on an idle 2-core CPU (the sweep dominates; several times longer on a loaded one)

The distillation loss is MSE only when ``--mse-only`` (no perceptual network: the GPU machine has no
stlpips wheel); the sweep metric is ``--sweep-metric`` (mse by default, which needs no weights).

Resumable (``--work`` keeps the stage log ``stages.json``): the device machine runs one command for at
most 10 minutes, so a run cut off there is continued by running the same command again. Stages up to the
saved calibrated checkpoint are then not re-run (the model is loaded from that checkpoint); the sweep
continues from its per-layer cache, and its time is summed over the calls (a cut-off call's share is
measured up to its last cached layer, so time spent on a layer that was cut off is not counted); any
other stage cut off is re-run whole. ``partial.json`` in ``--out`` is rewritten after every stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import toolchain  # noqa: E402,F401
from benchmarks.common import command_line, environment  # noqa: E402
from toolchain.calibration import BUNDLED_FACES  # noqa: E402
from toolchain.calibration.dataset import CalibrationSet, build_calibration_set  # noqa: E402
from toolchain.balance.transform import BalanceConfig  # noqa: E402
from toolchain.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from toolchain.lowrank.compensate import attach_branches, merge_all, train_branches  # noqa: E402
from toolchain.methods.balanced import balance_model  # noqa: E402
from toolchain.quant.registry import MethodContext  # noqa: E402
from toolchain.models import build_model, preset  # noqa: E402
from toolchain.quant.calibrate import calibrate_activations, calibrate_weights, prepare_model  # noqa: E402
from toolchain.quant.checkpoint import save_quantized  # noqa: E402
from toolchain.quant.config import QuantConfig  # noqa: E402


class Stages:
    """Times stages; with a ``log`` file the finished rows survive a cut-off run (see the module docstring)."""

    def __init__(self, device: torch.device, log: Path | None = None, partial: Path | None = None):
        self.device = device
        self.log, self.partial = log, partial
        self.rows: list[dict] = []
        self.calls = 1
        if log is not None and log.is_file():
            state = json.loads(log.read_text())
            self.rows, self.calls = state["rows"], state["calls"] + 1

    def done(self, name: str) -> bool:
        return any(r["stage"] == name for r in self.rows)

    def save(self) -> None:
        if self.log is not None:
            atomic_write_json(self.log, {"rows": self.rows, "calls": self.calls})
        if self.partial is not None:
            atomic_write_json(self.partial, {"stages": self.rows, "calls": self.calls})

    def run(self, name: str, fn, quiet: bool = False, **extra):
        """Time ``fn()``; the row is printed unless ``quiet`` (a caller that amends the row prints it itself)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        row = {"stage": name, "seconds": round(time.perf_counter() - t0, 2), **extra}
        if self.device.type == "cuda":
            row["peak_gpu_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self.rows.append(row)
        if not quiet:
            print(row, flush=True)
        self.save()
        return out


def mixed_precision_stages(st: Stages, model, qcfg, calib: Path, args, device: torch.device) -> dict:
    """Sensitivity sweep, error table and integer program on the calibrated model (before QD-LoRA, as
    the recipe orders them), then each activation quantizer re-gridded to its allocated bits."""
    from toolchain.alloc.allocate import SolveSettings, build_table
    from toolchain.alloc.common import activation_layers, quantizer_at_bits
    from toolchain.alloc.error_table import error_table
    from toolchain.alloc.sensitivity import SweepSettings, run_sensitivity

    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the bare GPU machine: the allocation's figures are not drawn there (the table is)
        import toolchain.alloc.allocate as A

        A.plot_bits = A.plot_sensitivity = lambda *a, **k: None
        print("matplotlib is not installed: allocation plots skipped", flush=True)
    ck = args.work / "calibrated"
    settings = SweepSettings(metric=args.sweep_metric, images=args.sweep_images)
    sweep_name = f"sensitivity sweep ({args.sweep_images} images, {args.sweep_metric})"
    cache = args.work / "alloc" / "sensitivity"
    # time of earlier, cut-off calls of the sweep: from their start to their last cached layer
    # each earlier call's share: from its start to its last cached layer before the next call began (a layer file belongs
    # to exactly one call, so nothing is counted twice, nor the idle time between calls)
    earlier = json.loads((args.work / "sweep_calls.json").read_text()) if (args.work / "sweep_calls.json").is_file() else []
    now = time.time()
    starts = [c["start"] for c in earlier] + [now]
    spent = 0.0
    for a, b in zip(starts, starts[1:]):
        stamps = [f.stat().st_mtime for f in cache.glob("*.json") if f.name != "_settings.json" and a <= f.stat().st_mtime < b]
        spent += max(stamps, default=a) - a
    atomic_write_json(args.work / "sweep_calls.json", earlier + [{"start": now}])
    sens = st.run(sweep_name, lambda: run_sensitivity(ck, calib, args.work / "alloc", settings, device=str(device)),
                  quiet=True, calls=len(earlier) + 1)
    st.rows[-1]["seconds"] = round(st.rows[-1]["seconds"] + spent, 2)
    print(st.rows[-1], flush=True)
    st.save()
    errors = st.run(f"error table ({args.error_images} images, bits 3-6)",
                    lambda: error_table(ck, calib, [3, 4, 5, 6], images=args.error_images, device=str(device)))
    table = st.run(f"integer program (budget A{args.budget_bits})",
                   lambda: build_table(sens, errors, SolveSettings(budget_bits=args.budget_bits), str(ck), args.work / "alloc",
                                       {"metric": args.sweep_metric}))
    bits = {r["name"]: r["a_bits"] for r in table["layers"]}

    def apply() -> int:
        n = 0
        for name, layer in activation_layers(model).items():
            if name in bits and layer.input_quantizer is not None and layer.input_quantizer.bits != bits[name]:
                layer.input_quantizer = quantizer_at_bits(layer.input_quantizer, bits[name])
                n += 1
        return n

    changed = st.run("apply allocated activation bits", apply)
    return {"average_a_bits": table["average_a_bits"], "layers": len(bits), "layers_changed": changed,
            "solver": table["solver"], "bits_histogram": {str(b): sum(v == b for v in bits.values()) for b in sorted(set(bits.values()))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="osdface")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30, help="QD-LoRA steps (ignored with --epochs)")
    ap.add_argument("--epochs", type=float, default=None, help="QD-LoRA passes over the calibration images")
    ap.add_argument("--mp", action="store_true", help="mixed precision: sweep + error table + MIP before QD-LoRA")
    ap.add_argument("--sweep-images", type=int, default=2)
    ap.add_argument("--sweep-metric", default="mse")
    ap.add_argument("--error-images", type=int, default=4)
    ap.add_argument("--budget-bits", type=float, default=4.0)
    ap.add_argument("--mse-only", action="store_true", help="distil with MSE only (no perceptual network)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantface_timing"))
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls/convolutions on CUDA (float32 stages: sweep, error table)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = preset(args.preset)
    args.work.mkdir(parents=True, exist_ok=True)
    st = Stages(device, args.work / "stages.json", args.out / "partial.json")
    args.out.mkdir(parents=True, exist_ok=True)
    calib = build_calibration_set([BUNDLED_FACES], args.work / "calib", n=args.images, size=cfg.image_size, seed=0, progress=False)
    batches = CalibrationSet.open(calib).batches(cfg.image_size, args.batch_size)
    qcfg = QuantConfig.for_bits("quantface", args.bits)
    ck = args.work / "calibrated"
    calibrated = "save calibrated checkpoint"
    if st.done(calibrated) and (ck / "quant_config.json").is_file():
        from toolchain.quant.checkpoint import load_quantized

        print(f"resuming (call {st.calls}): the calibrated model is loaded from {ck}", flush=True)
        st.rows = st.rows[: next(i for i, r in enumerate(st.rows) if r["stage"] == calibrated) + 1]  # later stages re-run
        model, _ = load_quantized(ck, device)
        layers = [n for n, d in json.loads((ck / "quant_config.json").read_text())["layers"].items()]
        bal = json.loads((args.work / "balance.json").read_text())
    else:
        st.rows, st.calls = [], 1  # the stages before the checkpoint are re-run together
        (args.work / "sweep_calls.json").unlink(missing_ok=True)
        model = st.run("build model (random init)", lambda: build_model(cfg, seed=0).to(device))
        ctx = MethodContext(lq_batches=batches, workdir=None, device=device, seed=0)
        layers = st.run("wrap layers", lambda: prepare_model(model, qcfg))
        bal = st.run("channel statistics + rotation-scaling balancing", lambda: balance_model(model, ctx, BalanceConfig()))
        atomic_write_json(args.work / "balance.json", {"online": bal.get("online")})
        st.run("SVD branch init (rank %d) + LoRA branch" % args.rank, lambda: attach_branches(model, args.rank, args.rank, 0))
        st.run("weight calibration", lambda: calibrate_weights(model))
        st.run("activation calibration", lambda: calibrate_activations(model, batches))
        st.run(calibrated, lambda: save_quantized(model, qcfg, ck, {"benchmark": "quantface_recipe_timing"}))
    params = sum(p.numel() for p in model.parameters())
    mp_summary = None
    if args.mp:
        mp_summary = mixed_precision_stages(st, model, qcfg, calib, args, device)
    if args.epochs is not None:
        args.steps = max(1, round(args.epochs * len(batches)))
    import shutil

    shutil.rmtree(args.work / "qdlora", ignore_errors=True)  # a cut-off distillation is re-run whole (timed whole)
    res = st.run(f"QD-LoRA distillation ({args.steps} steps = {args.steps * args.batch_size / max(1, args.images):.2f} epochs, batch {args.batch_size})",
                 lambda: train_branches(model, batches, args.work / "qdlora", args.steps, 1e-5, 0, device,
                                        w_perceptual=0.0 if args.mse_only else 0.5, w_mse=1.0 if args.mse_only else 0.5),
                 images=args.steps * args.batch_size)
    train_row = st.rows[-1]
    train_row["images_per_second"] = round(args.steps * args.batch_size / max(train_row["seconds"], 1e-9), 3)
    st.run("merge branches", lambda: merge_all(model))
    st.run("save checkpoint", lambda: save_quantized(model, qcfg, args.work / "final", {"benchmark": "quantface_recipe_timing"}))
    per_img = train_row["seconds"] / max(1, args.steps * args.batch_size)
    summary = {
        "command": command_line(), "environment": environment(), "preset": args.preset, "params_M": round(params / 1e6, 1),
        "image_size": cfg.image_size, "quantized_layers": len(layers), "bits": args.bits, "calibration_images": args.images,
        "calls": st.calls, "tf32": bool(args.tf32 and device.type == "cuda"),
        "stages": st.rows, "online_transforms": bal.get("online"), "qdlora_loss_first_last": [res.get("loss_first_10pct"), res.get("loss_last_10pct")],
        "extrapolated": {"seconds_per_training_image": round(per_img, 3),
                         "hours_for_512_image_epoch": round(per_img * 512 / 3600, 3)},
        "paper": "QD-LoRA calibration on 512 FFHQ images: 2.6 GPU-hours, 35.7 GB on one A800",
        "mixed_precision": mp_summary, "qdlora_steps": args.steps, "qdlora_epochs": round(args.steps * args.batch_size / max(1, args.images), 3),
        "total_minutes": round(sum(r["seconds"] for r in st.rows) / 60, 2),
        "peak_gpu_GiB": max((r.get("peak_gpu_GiB", 0) for r in st.rows), default=None),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", summary)
    lines = [f"# QuantFace recipe timing, `{args.preset}` preset ({summary['params_M']} M params, {cfg.image_size}px, {args.bits})\n",
             f"Command: `{summary['command']}`  ", f"Device: {summary['environment']['gpu'] or summary['environment']['cpu']}\n",
             "| stage | seconds | peak GPU memory (GiB) |", "|---|---|---|"]
    for r in st.rows:
        lines.append(f"| {r['stage']} | {r['seconds']} | {r.get('peak_gpu_GiB', '–')} |")
    lines.append(f"| **total** | {summary['total_minutes'] * 60:.1f} ({summary['total_minutes']} min) | {summary['peak_gpu_GiB'] or '–'} |")
    if mp_summary:
        lines.append(f"\nMixed precision: average A{mp_summary['average_a_bits']:.2f} over {mp_summary['layers']} layers "
                     f"(bits histogram {mp_summary['bits_histogram']}), solver {mp_summary['solver']['status']}.")
    lines.append(f"\nQD-LoRA throughput: {train_row['images_per_second']} images/s (batch {args.batch_size}); one pass over 512 images "
                 f"≈ {summary['extrapolated']['hours_for_512_image_epoch']} h. Paper: 2.6 GPU-hours and 35.7 GB on an A800 for 512 images "
                 "(its number of passes is not stated).")
    atomic_write_text(args.out / "results.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: the finished stages and the sweep's cached layers are kept in --work; run the same command "
              "again to resume", file=sys.stderr)
        sys.exit(130)
