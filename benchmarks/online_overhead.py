"""Operation overhead of QuantFace's online transforms on the full-size `osdface` preset.

Counts, at 512×512 input, the conv/linear MACs of UNet + VAE and what the online balancing
transforms (elementwise scale + Hadamard per position, on every layer whose input cannot be
folded into a producer) add, in three implementations:

  dense      C² MACs per position (a ±1 matrix product, e.g. a 1×1 conv);
  two-factor C = a·b with a ≈ b: two small matrix products, C·(a + b) MACs per position;
  fast       Walsh-Hadamard butterflies over the 2^k factor (k·C adds) + a dense m×m block (m·C MACs).

Shapes come from a forward pass on the meta device (no memory, no compute).

    python benchmarks/online_overhead.py [--size 512]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import toolchain  # noqa: E402,F401
from benchmarks.common import RESULTS, command_line, environment  # noqa: E402
from toolchain.balance.hadamard import factorize, is_available  # noqa: E402
from toolchain.balance.transform import fold_producers  # noqa: E402
from toolchain.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from toolchain.models import build_model, preset  # noqa: E402


def two_factor_cost(c: int) -> int:
    a = max(d for d in range(1, int(math.isqrt(c)) + 1) if c % d == 0)
    return c * (a + c // a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--out", type=Path, default=RESULTS / "online_overhead")
    args = ap.parse_args()
    with torch.device("meta"):
        model = build_model(preset("osdface"), seed=None)
    folds = fold_producers(model)
    rows = []
    handles = []

    def make(name, m):
        def hook(mod, inp, out):
            c = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            macs = out[0].numel() * (c // getattr(m, "groups", 1)) * (m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else 1)
            rows.append({"name": name, "c": c, "positions": inp[0][0].numel() // c, "macs": macs, "folded": name in folds})
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name.split(".")[0] in ("unet", "vae"):
            handles.append(m.register_forward_hook(make(name, m)))
    with torch.no_grad():
        model(torch.zeros(1, 3, args.size, args.size, device="meta"))
    model_macs = sum(r["macs"] for r in rows)
    totals = {"dense": 0, "two_factor": 0, "fast_macs": 0, "fast_adds": 0, "scale_muls": 0}
    online = 0
    for r in rows:
        if r["folded"]:
            continue
        c, p = r["c"], r["positions"]
        online += 1
        totals["scale_muls"] += c * p
        if not is_available(c):
            continue  # no rotation (3-channel VAE input): scale only
        m, pow2 = factorize(c)
        totals["dense"] += c * c * p
        totals["two_factor"] += two_factor_cost(c) * p
        totals["fast_macs"] += (m * c if m > 1 else 0) * p
        totals["fast_adds"] += int(math.log2(pow2)) * c * p
    res = {
        "command": command_line(), "environment": environment(), "size": args.size,
        "model_conv_linear_GMACs": model_macs / 1e9, "layers": len(rows), "online_layers": online,
        "folded_layers": sum(r["folded"] for r in rows),
        "overhead_GMACs": {"dense": totals["dense"] / 1e9, "two_factor": totals["two_factor"] / 1e9,
                           "fast_block_macs": totals["fast_macs"] / 1e9, "fast_butterfly_adds": totals["fast_adds"] / 1e9,
                           "scale_muls": totals["scale_muls"] / 1e9},
    }
    fast_ops = (totals["fast_macs"] + totals["fast_adds"] + totals["scale_muls"]) / model_macs
    res["overhead_percent"] = {"dense": 100 * (totals["dense"] + totals["scale_muls"]) / model_macs,
                               "two_factor": 100 * (totals["two_factor"] + totals["scale_muls"]) / model_macs,
                               "fast (MACs + adds + scales, counted as ops)": 100 * fast_ops,
                               "fast (ops vs 2·MACs model FLOPs)": 100 * (totals["fast_macs"] * 2 + totals["fast_adds"] + totals["scale_muls"]) / (2 * model_macs)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", res)
    pct = res["overhead_percent"]
    md = f"""# Online-transform overhead, `osdface` preset at {args.size}×{args.size}

Command: `{res['command']}` (shapes from a meta-device forward; device-independent counts)

UNet + VAE conv/linear: {res['model_conv_linear_GMACs']:.1f} GMACs over {res['layers']} layers; {res['online_layers']} layers need an
online transform, {res['folded_layers']} fold it into their producer (attention output projections, VAE quant/post-quant convs).

| implementation | added | overhead |
|---|---|---|
| dense ±1 matrix per position (C² MACs) | {res['overhead_GMACs']['dense']:.1f} GMACs | {pct['dense']:.2f} % |
| two-factor (C = a·b, two small products) | {res['overhead_GMACs']['two_factor']:.1f} GMACs | {pct['two_factor']:.2f} % |
| fast: butterflies + dense m×m block | {res['overhead_GMACs']['fast_block_macs']:.1f} GMACs + {res['overhead_GMACs']['fast_butterfly_adds']:.1f} G adds | {pct['fast (ops vs 2·MACs model FLOPs)']:.2f} % of model FLOPs |

Elementwise scales add {res['overhead_GMACs']['scale_muls']:.1f} G multiplies (included above). The paper reports +2.15 % ops for its fast transform.
"""
    atomic_write_text(args.out / "results.md", md)
    print(md)


if __name__ == "__main__":
    main()
