"""Full-size OSDFace release import → QuantFace W4A4 → ONNX export, timed per stage (random weights).

Writes the release layout at SD-2.1 size (the `osdface` preset's UNet/VAE as a diffusers folder,
`associate_2.ckpt` as a Lightning pickle with the 173-tensor VRE at release width plus decoy keys,
`embedding_change_weights.pth`, a rank-16 UNet LoRA), imports it with `toolchain model import
osdface`'s function, quantizes the imported model (QuantFace W4A4, a few distillation steps) and
exports the UNet to QDQ ONNX; each stage's wall time and peak memory (GPU and host RSS) go to
results.json. `--small` uses the tests' small SD folder instead (a CPU smoke run).

    python benchmarks/import_release_timing.py --out benchmarks/results/import_release_osdface
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

import toolchain  # noqa: E402,F401
from benchmarks.common import command_line, environment  # noqa: E402
from toolchain.io.atomic import atomic_write_json  # noqa: E402


def write_full_release(root: Path) -> dict[str, Path]:
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    from release_files import LORA_TARGETS, decoy_keys, lightning_ckpt, release_lora, release_projection, release_vre_state
    from toolchain.models import build_model, preset

    model = build_model(preset("osdface"), seed=0)
    sd = root / "sd"
    model.unet.save_pretrained(sd / "unet")
    model.vae.save_pretrained(sd / "vae")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                  steps_offset=1, num_train_timesteps=1000).save_pretrained(sd / "scheduler")
    vre = lightning_ckpt(root / "associate_2.ckpt", {**release_vre_state(ch=64, z=512, n_e=1024), **decoy_keys()})
    proj = root / "embedding_change_weights.pth"
    torch.save(release_projection(e_dim=512, cross=1024), proj)
    lora = root / "pytorch_lora_weights.safetensors"
    save_file({k: v.contiguous() for k, v in release_lora(model.unet.state_dict(), rank=16, targets=LORA_TARGETS).items()}, str(lora))
    return {"sd": sd, "vre": vre, "proj": proj, "lora": lora}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/import_release"))
    ap.add_argument("--steps", type=int, default=4, help="QD-LoRA distillation steps")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="the tests' small SD folder (CPU smoke run)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)

    def stage(name: str, fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        row = {"stage": name, "seconds": round(time.perf_counter() - t, 1),
               "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
        if dev.type == "cuda":
            row["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rows.append(row)
        print(row, flush=True)
        atomic_write_json(args.out / "results.json", {"command": command_line(), "environment": environment(), "stages": rows})
        return out

    from toolchain.calibration import BUNDLED_FACES
    from toolchain.calibration.dataset import CalibrationSet, build_calibration_set
    from toolchain.export.onnx_backend import export_onnx
    from toolchain.quant.registry import MethodContext
    from toolchain.models import load_model
    from toolchain.models.release.osdface import import_osdface
    from toolchain.quant.api import quantize_
    from toolchain.quant.config import QuantConfig

    if args.small:
        from release_files import osdface_release

        files = stage("write small release files", lambda: osdface_release(args.work))
    else:
        files = stage("write full-size release files (random weights)", lambda: write_full_release(args.work))
    report = stage("model import osdface", lambda: import_osdface(files["sd"], files["vre"], files["proj"], files["lora"], args.work / "model"))
    model = stage("load imported model", lambda: load_model(args.work / "model").to(dev))
    size = model.config.image_size
    calib = build_calibration_set([BUNDLED_FACES], args.work / "calib", n=args.images, size=size, seed=0, progress=False)
    batches = CalibrationSet.open(calib).batches(size, 1)
    cfg = QuantConfig.for_bits("quantface", "w4a4", params={"train_steps": args.steps, "checkpoint_every": 10**6})
    summary = stage(f"quantize quantface W4A4 ({args.steps} QD-LoRA steps, {args.images} images)",
                    lambda: quantize_(model, cfg, MethodContext(lq_batches=batches, device=dev, seed=0)))
    model = model.cpu()
    rep = stage("export --part unet --target onnx", lambda: export_onnx(model, args.work / "unet.onnx", part="unet"))
    atomic_write_json(args.out / "results.json", {
        "command": command_line(), "environment": environment(), "stages": rows,
        "import_report": {k: report[k] for k in report if k in ("lora", "vre", "dropped", "one_step", "sources")},
        "quantize_summary_keys": sorted(summary) if isinstance(summary, dict) else None,
        "onnx": {k: rep[k] for k in ("bytes", "external_data", "int4_weight_layers", "int8_weight_layers")}})


if __name__ == "__main__":
    main()
