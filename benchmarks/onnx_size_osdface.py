"""ONNX size of the `osdface` preset's embedder with float16 vs float32 weights, and the W4 size ratio it gives.

The embedder stays float in QuantFace's default scope, so its file is the same in a float and in a W4A4
export; this script exports it from a randomly initialised `osdface` model with ``float_weights`` fp32 and
fp16 (the default of quantized exports) and combines the fp16 size with the quantized UNet/VAE sizes and the
FP32 sizes of `benchmarks/results/onnx_osdface/results.json` (MinMax W4A4: no low-rank branches; those
UNet/VAE exports are unchanged by the float16 storage of float layers), with this run's float32 embedder in
the FP32 total.

    python benchmarks/onnx_size_osdface.py --out benchmarks/results/onnx_size_osdface
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--earlier", type=Path, default=Path(__file__).resolve().parent / "results/onnx_osdface/results.json")
    a = ap.parse_args()

    import toolchain  # noqa: F401
    from benchmarks.common import command_line, environment
    from toolchain.export.onnx_backend import export_onnx
    from toolchain.io.atomic import atomic_write_json, atomic_write_text
    from toolchain.models import build_model, preset

    model = build_model(preset("osdface"), seed=0)
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fw in ("fp32", "fp16"):
            rep = export_onnx(model, Path(tmp) / f"embedder_{fw}.onnx", part="embedder", float_weights=fw)
            sizes[fw] = {"bytes": rep["bytes"], "float16_layers": rep["float16_layers"], "seconds": rep["seconds"]}
            print(fw, sizes[fw], flush=True)
    earlier = json.loads(a.earlier.read_text())
    parts = earlier["parts"]
    w4 = sum(parts[p]["qdq"]["bytes"] for p in ("unet", "vae_encoder", "vae_decoder"))
    # FP32 total with this run's embedder (the release VRE architecture changed the embedder since the earlier run)
    fp32 = earlier["total"]["fp32_bytes"] - parts["embedder"]["fp32"]["bytes"] + sizes["fp32"]["bytes"]
    summary = {"command": command_line(), "environment": environment(), "embedder": sizes,
               "embedder_fp32_bytes_earlier_run": parts["embedder"]["fp32"]["bytes"],
               "w4_bytes_unet_vae_earlier_run": w4, "fp32_bytes_total": fp32,
               "onnx_w4_size_ratio": (w4 + sizes["fp16"]["bytes"]) / fp32,
               "onnx_w4_size_ratio_fp32_embedder": (w4 + sizes["fp32"]["bytes"]) / fp32,
               "earlier_run": str(a.earlier), "earlier_command": earlier["command"]}
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out / "results.json", summary)
    atomic_write_text(a.out / "results.md", "\n".join([
        "# ONNX size of the `osdface` W4 export with a float16 embedder", "",
        f"Command: `{summary['command']}`", "",
        "| embedder weights | embedder bytes | W4 export / FP32 (UNet + VAE W4A4 + embedder) |", "|---|---|---|",
        f"| float32 | {sizes['fp32']['bytes']:,} | {summary['onnx_w4_size_ratio_fp32_embedder']:.4f} |",
        f"| float16 (default of quantized exports) | {sizes['fp16']['bytes']:,} | **{summary['onnx_w4_size_ratio']:.4f}** |", "",
        f"UNet/VAE W4A4 and FP32 sizes from `{a.earlier}` (`{earlier['command']}`); the FP32 total uses this run's "
        "float32 embedder (the embedder's architecture changed since that run).", ""]))


if __name__ == "__main__":
    main()
