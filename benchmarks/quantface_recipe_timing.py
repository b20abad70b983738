"""Wall time, peak memory and throughput of the full QuantFace recipe (balancing + QD-LoRA) per stage.

Runs the same stages as `toolchain quantize --method quantface` one by one, timing each, on a model
of the chosen preset (random initialisation is enough for timing). Calibration images are the
bundled faces resized to the model size and degraded (cycled to --images).

    python benchmarks/quantface_recipe_timing.py --preset osdface --images 16 --steps 30 --out benchmarks/results/quantface_recipe_osdface
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import toolchain  # noqa: E402,F401
from benchmarks.common import command_line, environment  # noqa: E402
from calibration import BUNDLED_FACES  # noqa: E402
from calibration.dataset import CalibrationSet, build_calibration_set  # noqa: E402
from toolchain.balance.transform import BalanceConfig  # noqa: E402
from toolchain.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from toolchain.lowrank.compensate import attach_branches, merge_all, train_branches  # noqa: E402
from toolchain.methods.balanced import balance_model  # noqa: E402
from toolchain.methods.registry import MethodContext  # noqa: E402
from toolchain.models import build_model, preset  # noqa: E402
from toolchain.quant.calibrate import calibrate_activations, calibrate_weights, prepare_model  # noqa: E402
from toolchain.quant.config import QuantConfig  # noqa: E402


class Stages:
    def __init__(self, device: torch.device):
        self.device = device
        self.rows: list[dict] = []

    def run(self, name: str, fn, **extra):
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
        print(row, flush=True)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="osdface")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantface_timing"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset(args.preset)
    st = Stages(device)
    model = st.run("build model (random init)", lambda: build_model(cfg, seed=0).to(device))
    params = sum(p.numel() for p in model.parameters())
    calib = build_calibration_set([BUNDLED_FACES], args.work / "calib", n=args.images, size=cfg.image_size, seed=0, progress=False)
    batches = CalibrationSet.open(calib).batches(cfg.image_size, args.batch_size)
    ctx = MethodContext(lq_batches=batches, workdir=None, device=device, seed=0)
    qcfg = QuantConfig.for_bits("quantface", args.bits)
    layers = st.run("wrap layers", lambda: prepare_model(model, qcfg))
    bal = st.run("channel statistics + rotation-scaling balancing", lambda: balance_model(model, ctx, BalanceConfig()))
    st.run("SVD branch init (rank %d) + LoRA branch" % args.rank, lambda: attach_branches(model, args.rank, args.rank, 0))
    st.run("weight calibration", lambda: calibrate_weights(model))
    st.run("activation calibration", lambda: calibrate_activations(model, batches))
    res = st.run(f"QD-LoRA distillation ({args.steps} steps, batch {args.batch_size})",
                 lambda: train_branches(model, batches, args.work / "qdlora", args.steps, 1e-5, 0, device), images=args.steps * args.batch_size)
    train_row = st.rows[-1]
    train_row["images_per_second"] = round(args.steps * args.batch_size / max(train_row["seconds"], 1e-9), 3)
    st.run("merge branches", lambda: merge_all(model))
    per_img = train_row["seconds"] / max(1, args.steps * args.batch_size)
    summary = {
        "command": command_line(), "environment": environment(), "preset": args.preset, "params_M": round(params / 1e6, 1),
        "image_size": cfg.image_size, "quantized_layers": len(layers), "bits": args.bits, "calibration_images": args.images,
        "stages": st.rows, "online_transforms": bal.get("online"), "qdlora_loss_first_last": [res.get("loss_first_10pct"), res.get("loss_last_10pct")],
        "extrapolated": {"seconds_per_training_image": round(per_img, 3),
                         "hours_for_512_image_epoch": round(per_img * 512 / 3600, 3)},
        "paper": "QD-LoRA calibration on 512 FFHQ images: 2.6 GPU-hours, 35.7 GB on one A800",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", summary)
    lines = [f"# QuantFace recipe timing, `{args.preset}` preset ({summary['params_M']} M params, {cfg.image_size}px, {args.bits})\n",
             f"Command: `{summary['command']}`  ", f"Device: {summary['environment']['gpu'] or summary['environment']['cpu']}\n",
             "| stage | seconds | peak GPU memory (GiB) |", "|---|---|---|"]
    for r in st.rows:
        lines.append(f"| {r['stage']} | {r['seconds']} | {r.get('peak_gpu_GiB', '–')} |")
    lines.append(f"\nQD-LoRA throughput: {train_row['images_per_second']} images/s (batch {args.batch_size}); one pass over 512 images "
                 f"≈ {summary['extrapolated']['hours_for_512_image_epoch']} h. Paper: 2.6 GPU-hours and 35.7 GB on an A800 for 512 images "
                 "(its number of passes is not stated).")
    atomic_write_text(args.out / "results.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
