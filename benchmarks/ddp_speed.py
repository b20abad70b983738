"""Data-parallel speed: QD-LoRA images/s and the sensitivity sweep's wall time on N vs 1 process.

Run on a 2-GPU machine (issue 17, item 3/4):

    python benchmarks/ddp_speed.py --nproc 2 --out benchmarks/results/ddp_speed

Every configuration is a real `toolchain` command (the same CLI a user runs), started through
torchrun (`--nproc-per-node N`), so the timings include what a user pays. QD-LoRA throughput (weak scaling:
the same batch per process, loss MSE only) is taken from the trainer's own timing (``qdlora.seconds`` in the checkpoint summary: training steps
only, not calibration), images/s = steps × global batch / seconds. The sweep time is the
``seconds_this_run`` of ``sensitivity.json`` (a fresh cache each time).

``--small`` uses the tiny preset on the CPU with gloo (a smoke test of this script, a few minutes
on 2 cores; its numbers mean nothing). Writes ``results.json`` with ``ddp_2gpu_speedup`` and
``sweep_2gpu_speedup`` (N-process over 1-process ratios; the names assume N = 2), images/s per
configuration, the exact commands and the device names.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], env: dict) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=REPO)
    return time.perf_counter() - t0


def _find(doc, key):
    if isinstance(doc, dict):
        if key in doc:
            return doc[key]
        for v in doc.values():
            r = _find(v, key)
            if r is not None:
                return r
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ddp_speed")
    ap.add_argument("--small", action="store_true", help="tiny preset on the CPU (gloo): a smoke test")
    ap.add_argument("--preset", default="osdface")
    ap.add_argument("--model", type=Path, default=None, help="float model (default: a fresh random model of --preset)")
    ap.add_argument("--images", type=int, default=64, help="calibration images")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2, help="batch per process (the global batch is N times this)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sweep-images", type=int, default=8)
    ap.add_argument("--parts", default="qdlora,sweep", help="what to time: qdlora, sweep (the sweep times a 1-process QD-LoRA checkpoint)")
    args = ap.parse_args()
    if args.small:
        args.preset, args.images, args.size, args.batch_size, args.steps, args.sweep_images = "tiny", 8, 64, 4, 4, 2
    device = "cpu" if args.small else "cuda"
    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    py = [sys.executable]

    model = args.model
    if model is None:
        model = work / f"{args.preset}.safetensors"
        subprocess.run([*py, "-c", "import sys; from toolchain.models import build_model, preset, save_model; "
                        f"save_model(build_model(preset('{args.preset}'), seed=0), sys.argv[1])", str(model)], env=env, check=True)
    calib = work / "calib"
    subprocess.run([*py, "-c", "import sys; from calibration import BUNDLED_FACES; from calibration.dataset import build_calibration_set; "
                    f"build_calibration_set([BUNDLED_FACES], sys.argv[1], n={args.images}, size={args.size}, seed=0, progress=False)",
                    str(calib)], env=env, check=True)

    results: dict = {"preset": args.preset, "images": args.images, "size": args.size, "batch_per_process": args.batch_size, "steps": args.steps,
                     "nproc": args.nproc, "small_smoke_test": args.small, "commands": {}, "configs": {}}
    try:
        import torch

        results["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if device == "cuda" else ["cpu"]
        results["torch"] = torch.__version__
    except Exception as exc:  # noqa: BLE001  (reporting only)
        results["devices"] = [f"unknown ({exc})"]

    parts = set(args.parts.split(","))
    ckpt_for_sweep = None
    for n in (1, args.nproc) if "qdlora" in parts else (1,):
        out = work / f"q{n}"
        # weak scaling: the same batch per process, so the global batch grows with the process count
        cmd = [*py, "-m", "toolchain", "quantize", "--model", str(model), "--preset", args.preset, "--method", "quantface", "--bits", "w4a4",
               "--calib", str(calib), "--device", device, "--batch-size", str(args.batch_size * n), "--param", f"train_steps={args.steps}",
               "--param", f"checkpoint_every={args.steps}", "--param", "w_perceptual=0", "--param", "w_mse=1",
               "--out", str(out), "--nproc-per-node", str(n)]
        wall = _run(cmd, env)
        summary = json.loads((out / "quant_config.json").read_text())
        train_s = _find(summary, "qdlora")["seconds"]
        results["commands"][f"qdlora_{n}"] = " ".join(cmd)
        results["configs"][f"qdlora_{n}proc"] = {"train_seconds": train_s, "wall_seconds": round(wall, 1),
                                                 "global_batch": args.batch_size * n,
                                                 "images_per_s": round(args.steps * args.batch_size * n / max(train_s, 1e-9), 3)}
        ckpt_for_sweep = ckpt_for_sweep or out
    for n in (1, args.nproc) if "sweep" in parts else ():
        out = work / f"alloc{n}"
        cmd = [*py, "-m", "toolchain", "allocate", "sensitivity", "--checkpoint", str(ckpt_for_sweep), "--calib", str(calib),
               "--out", str(out), "--images", str(args.sweep_images), "--metric", "mse", "--device", device, "--nproc-per-node", str(n)]
        wall = _run(cmd, env)
        sens = json.loads((out / "sensitivity.json").read_text())
        results["commands"][f"sweep_{n}"] = " ".join(cmd)
        results["configs"][f"sweep_{n}proc"] = {"sweep_seconds": sens["seconds_this_run"], "wall_seconds": round(wall, 1),
                                                "layers": len(sens["layers"])}
    c = results["configs"]
    if "qdlora" in parts:
        results["ddp_2gpu_speedup"] = round(c[f"qdlora_{args.nproc}proc"]["images_per_s"] / c["qdlora_1proc"]["images_per_s"], 3)
    if "sweep" in parts:
        results["sweep_2gpu_speedup"] = round(c["sweep_1proc"]["sweep_seconds"] / max(c[f"sweep_{args.nproc}proc"]["sweep_seconds"], 1e-9), 3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: results.get(k) for k in ("ddp_2gpu_speedup", "sweep_2gpu_speedup", "devices", "configs")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
