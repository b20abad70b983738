"""How far an integer TFLite export is from its checkpoint's fake-quant model, and what that costs in
quality vs HQ (issue 18: "TFLite vs fake quant ≥ 30 dB at W4A4, ST-LPIPS vs HQ within 0.01").

For each held-out face (LQ → restored, one image per call, as the app runs it): the float model, the
checkpoint's PyTorch fake-quant model and the TFLite export's ``restore`` signature (LiteRT, XNNPACK).
Reports PSNR of TFLite vs fake quant and vs FP, and PSNR / ST-LPIPS vs HQ of each, per checkpoint.

    toolchain quantize --method quantface --bits w4a4 --param train_steps=40 --param lr=0.0001 \\
        --calib benchmarks/.cache/calib_n64_s128_seed0 --out CK
    toolchain export --checkpoint CK --target tflite --part full --calib benchmarks/.cache/calib_n64_s128_seed0 --out CK.tflite
    python benchmarks/tflite_parity.py --pair "QuantFace W4A4=CK,CK.tflite" [--pair ...] \\
        --eval benchmarks/.cache/heldout_n64_s128_seed1 --images 32 --out benchmarks/results/tflite_parity
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import command_line, environment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", action="append", required=True, help="LABEL=CHECKPOINT_DIR,EXPORT.tflite (repeatable)")
    ap.add_argument("--eval", type=Path, required=True, help="held-out set (toolchain calibrate folder with lq/ and hq/)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from tqdm import tqdm

    from toolchain.calibration.dataset import CalibrationSet
    from toolchain.eval.metrics import psnr, st_lpips
    from toolchain.export.litert.runtime import tflite_runner
    from toolchain.io.atomic import atomic_write_json, atomic_write_text
    from toolchain.models import load_model
    from toolchain.quant.checkpoint import load_quantized

    data = CalibrationSet.open(args.eval)
    lq = torch.cat(data.batches(128, 8, limit=args.images))
    hq = (torch.cat(data.batches(128, 8, limit=args.images, which="hq")) + 1) / 2

    def one_by_one(fn) -> torch.Tensor:  # [0, 1] outputs, one image per call
        with torch.no_grad():
            return torch.cat([(torch.as_tensor(fn(lq[i:i + 1])).float().clamp(-1, 1) + 1) / 2 for i in range(lq.shape[0])])

    def scores(out: torch.Tensor) -> dict[str, float]:
        return {"psnr": float(psnr(out, hq).mean()), "st_lpips": float(st_lpips(out, hq).mean())}

    fp_out = None
    rows = {}
    for spec in tqdm(args.pair, desc="checkpoints"):
        label, _, paths = spec.partition("=")
        ck, tfl = (Path(p) for p in paths.split(","))
        model, meta = load_quantized(ck)
        if fp_out is None:
            fp = load_model(meta["summary"].get("source_model") or None).eval()
            fp_out = one_by_one(fp)
        fq_out = one_by_one(model)
        run = tflite_runner(tfl.read_bytes(), threads=args.threads, name=tfl.name)
        tfl_out = one_by_one(lambda x: run((x,)))
        rows[label] = {
            "checkpoint": str(ck), "tflite": str(tfl),
            "tflite_vs_fake_quant_psnr": float(psnr(tfl_out, fq_out).mean()),
            "fake_quant_vs_fp_psnr": float(psnr(fq_out, fp_out).mean()),
            "tflite_vs_fp_psnr": float(psnr(tfl_out, fp_out).mean()),
            "vs_hq": {"fake_quant": scores(fq_out), "tflite": scores(tfl_out)},
        }
        rows[label]["st_lpips_tflite_minus_fake_quant"] = rows[label]["vs_hq"]["tflite"]["st_lpips"] - rows[label]["vs_hq"]["fake_quant"]["st_lpips"]
    res = {"command": command_line(), "environment": environment(), "images": int(lq.shape[0]), "eval": str(args.eval),
           "fp_vs_hq": scores(fp_out), "lq_vs_hq": scores((lq + 1) / 2), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", res)
    L = ["# TFLite export vs its fake-quant checkpoint\n", f"Command: `{res['command']}`  ",
         f"Device: {res['environment']['cpu']} ({args.threads} LiteRT threads, XNNPACK)  ",
         f"{res['images']} held-out faces ({args.eval.name}), 128 px, one image per call.\n",
         "| checkpoint | TFLite vs fake quant (dB) | fake quant vs FP (dB) | TFLite vs FP (dB) | ST-LPIPS vs HQ: fake quant | TFLite | Δ |",
         "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        L.append(f"| {label} | {r['tflite_vs_fake_quant_psnr']:.2f} | {r['fake_quant_vs_fp_psnr']:.2f} | {r['tflite_vs_fp_psnr']:.2f} | "
                 f"{r['vs_hq']['fake_quant']['st_lpips']:.4f} | {r['vs_hq']['tflite']['st_lpips']:.4f} | "
                 f"{r['st_lpips_tflite_minus_fake_quant']:+.4f} |")
    L.append(f"\nFP vs HQ: PSNR {res['fp_vs_hq']['psnr']:.2f} dB, ST-LPIPS {res['fp_vs_hq']['st_lpips']:.4f}; degraded input vs HQ: "
             f"PSNR {res['lq_vs_hq']['psnr']:.2f} dB, ST-LPIPS {res['lq_vs_hq']['st_lpips']:.4f}.")
    atomic_write_text(args.out / "results.md", "\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
