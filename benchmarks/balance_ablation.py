"""Balancing ablation (QuantFace Fig. 4 and §3.1): none / scale / rotate / rotate-scale / auto.

For each balancing mode, on the reference model:
  * per-layer relative error of 4-bit per-tensor activation quantization of the layer input
    (after the mode's transform) and of 4-bit per-channel weight quantization;
  * end-to-end W4A4 quality (PSNR / ST-LPIPS vs FP and vs HQ) on held-out faces;
and a Fig.-4-style plot of one layer's per-channel input range before/after each transform.

    python benchmarks/balance_ablation.py [--faces DIR] [--calib 64] [--eval 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import toolchain  # noqa: E402,F401
from benchmarks.common import DEFAULT_FACES, RESULTS, command_line, environment, face_sets  # noqa: E402
from toolchain.calibration.dataset import CalibrationSet  # noqa: E402
from toolchain.balance.stats import channel_axis, collect_input_absmax  # noqa: E402
from toolchain.balance.transform import BalanceConfig, apply_balancing, plan_balancing  # noqa: E402
from toolchain.defaults import DEFAULT_MODEL  # noqa: E402
from toolchain.eval.evaluate import restore_set, score  # noqa: E402
from toolchain.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from toolchain.methods import MethodContext  # noqa: E402
from toolchain.models import load_model  # noqa: E402
from toolchain.quant.api import quantize_  # noqa: E402
from toolchain.quant.calibrate import prepare_model, quant_layers, quantizers_off  # noqa: E402
from toolchain.quant.config import QuantConfig  # noqa: E402
from toolchain.quant.quantizer import FakeQuantizer, QuantSpec, fake_quantize, qparams_from_range  # noqa: E402

MODES = ["none", "scale", "rotate", "rotate-scale", "auto"]


def layer_errors(model_path: Path, batches: list[torch.Tensor], mode: str) -> tuple[dict, dict, dict]:
    """Per layer: 4-bit activation rel. error, 4-bit weight rel. error, transformed-input channel absmax."""
    model = load_model(model_path)
    prepare_model(model, QuantConfig.for_bits("minmax", "w4a4"))
    layers = dict(quant_layers(model))
    act_err, absmax_after = {}, {}
    with quantizers_off(model):
        stats = collect_input_absmax(model, layers, batches)
        apply_balancing(model, plan_balancing(model, layers, stats, BalanceConfig(mode=mode), batches=batches[:2]))
        hooks = []
        spec = QuantSpec(4)

        def make(name, layer):
            def hook(mod, args):
                x = mod.input_transform(args[0]).detach()
                s, z = qparams_from_range(x.min(), x.max(), spec)
                err = float((fake_quantize(x, s, z, spec.qmin, spec.qmax) - x).pow(2).sum() / x.pow(2).sum().clamp(min=1e-12))
                act_err[name] = act_err.get(name, 0.0) + err / len(batches)
                axis = channel_axis(layer)
                cur = x.abs().movedim(axis, -1).reshape(-1, x.shape[axis]).amax(0)
                absmax_after[name] = cur if name not in absmax_after else torch.maximum(absmax_after[name], cur)
            return hook

        for name, layer in layers.items():
            hooks.append(layer.register_forward_pre_hook(make(name, layer)))
        with torch.no_grad():
            for b in batches:
                model(b)
        for h in hooks:
            h.remove()
    w_err = {}
    for name, layer in layers.items():
        w = layer.weight.detach()
        q = FakeQuantizer(QuantSpec(4, symmetric=True, per_channel=True), w.shape[0])
        q.calibrate_weight(w)
        w_err[name] = float((q(w) - w).pow(2).sum() / w.pow(2).sum())
    return act_err, w_err, absmax_after


def end_to_end(model_path: Path, calib: list[torch.Tensor], eval_lq: list[torch.Tensor], hq: torch.Tensor, fp_out: torch.Tensor, mode: str) -> dict:
    model = load_model(model_path)
    cfg = QuantConfig.for_bits("quantface", "w4a4", params={"balance": mode})
    summary = quantize_(model, cfg, MethodContext(calib))
    out = restore_set(model, eval_lq, desc=mode)
    metrics = ["psnr", "ssim", "st_lpips"]
    return {"vs_fp": score(out, fp_out, metrics), "vs_hq": score(out, hq, metrics), "modes_chosen": summary["balance"].get("modes")}


def fig4(absmax_before: torch.Tensor, after: dict[str, torch.Tensor], layer: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(after) + 1, figsize=(4 * (len(after) + 1), 3), sharey=True)
    axes[0].bar(range(len(absmax_before)), absmax_before.numpy(), width=1.0, color="gray")
    axes[0].set_title("original")
    for ax, (mode, v) in zip(axes[1:], after.items()):
        ax.bar(range(len(v)), v.numpy(), width=1.0)
        ax.set_title(mode)
    for ax in axes:
        ax.set_xlabel("input channel")
    axes[0].set_ylabel("max |x|")
    fig.suptitle(f"per-channel input range of {layer}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=Path, default=DEFAULT_FACES)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS / "balance_ablation")
    args = ap.parse_args()
    torch.manual_seed(0)
    calib_dir, eval_dir = face_sets(args.faces, args.calib, args.eval)
    calib = CalibrationSet.open(calib_dir).batches(128, 8)
    ev = CalibrationSet.open(eval_dir)
    eval_lq = ev.batches(128, 8)
    hq = (torch.cat(ev.batches(128, 8, which="hq")) + 1) / 2
    fp_out = restore_set(load_model(args.model), eval_lq, desc="FP")

    per_layer, e2e, after = {}, {}, {}
    for mode in MODES:
        act, wgt, absmax = layer_errors(args.model, calib[:4], mode)
        per_layer[mode] = {"activation": act, "weight": wgt}
        e2e[mode] = end_to_end(args.model, calib, eval_lq, hq, fp_out, mode)
        after[mode] = absmax
        print(f"{mode:>13}: act err median {np.median(list(act.values())):.4f}  weight err median {np.median(list(wgt.values())):.4f}  "
              f"W4A4 vs FP {e2e[mode]['vs_fp']['psnr']:.2f} dB, ST-LPIPS vs HQ {e2e[mode]['vs_hq']['st_lpips']:.4f}")

    # Fig. 4: the layer whose input has the largest channel outlier ratio
    before = after["none"]
    layer = max(before, key=lambda n: float(before[n].max() / before[n].median().clamp(min=1e-6)) if before[n].numel() > 8 else 0.0)
    args.out.mkdir(parents=True, exist_ok=True)
    fig4(before[layer], {m: after[m][layer] for m in MODES[1:]}, layer, args.out / "fig4_channel_ranges.png")

    fp_hq = score(fp_out, hq, ["psnr", "ssim", "st_lpips"])
    summary = {
        "command": command_line(), "environment": environment(), "model": str(args.model), "calibration": str(calib_dir), "eval": str(eval_dir),
        "fp_vs_hq": fp_hq,
        "modes": {m: {"act_err_median": float(np.median(list(per_layer[m]["activation"].values()))),
                      "act_err_mean": float(np.mean(list(per_layer[m]["activation"].values()))),
                      "weight_err_median": float(np.median(list(per_layer[m]["weight"].values()))),
                      "lowest_act_err_layers": sum(1 for n in per_layer["none"]["activation"]
                                                   if min(MODES[:4], key=lambda k: per_layer[k]["activation"][n]) == m),
                      **{f"w4a4_{k}": {kk: vv for kk, vv in v.items() if not kk.endswith("_per_image")} for k, v in e2e[m].items() if k != "modes_chosen"},
                      "auto_modes_chosen": e2e[m]["modes_chosen"]} for m in MODES},
        "fig4_layer": layer,
        "per_layer": per_layer,
    }
    atomic_write_json(args.out / "results.json", summary)
    lines = [f"# Balancing ablation on the reference model (W4A4)\n", f"Command: `{summary['command']}`  ",
             f"Device: {summary['environment']['cpu']} ({summary['environment']['threads']} threads), git {summary['environment']['git']}  ",
             f"Calibration: {args.calib} training faces; evaluation: {args.eval} held-out faces (UTKFace split of the reference model).\n",
             "| mode | act. err (median rel. MSE, A4) | layers where lowest act. err | weight err (median, W4) | W4A4 PSNR vs FP | W4A4 PSNR vs HQ | W4A4 ST-LPIPS vs HQ |",
             "|---|---|---|---|---|---|---|"]
    for m in MODES:
        s = summary["modes"][m]
        lines.append(f"| {m} | {s['act_err_median']:.4f} | {s['lowest_act_err_layers'] if m != 'auto' else '–'} | {s['weight_err_median']:.4f} | "
                     f"{s['w4a4_vs_fp']['psnr']:.2f} | {s['w4a4_vs_hq']['psnr']:.2f} | {s['w4a4_vs_hq']['st_lpips']:.4f} |")
    lines.append(f"\nFP model vs HQ: PSNR {fp_hq['psnr']:.2f} dB, ST-LPIPS {fp_hq['st_lpips']:.4f}. Fig. 4-style plot: `fig4_channel_ranges.png` ({layer}).")
    atomic_write_text(args.out / "results.md", "\n".join(lines) + "\n")
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
