"""Why W4A4 collapses on the reference model, and which QuantFace settings help (CPU, tens of minutes).

Stages (each cached as JSON in --work, so a rerun skips finished ones and a killed run resumes):

  a  per-layer error propagation: MinMax W4A4 ranges calibrated once; then each quantized layer alone
     is switched on (everything else float) as W4A4, A4 only and W4 only, and the restored images are
     scored against the float model's (PSNR, ST-LPIPS). Also every layer *kind* alone
     (toolchain.quant.kinds) in the three modes.
  b  activation range observers at 4 bits per layer kind: min-max, percentile 99.99 / 99.9, MSE search.
     Only that kind's activations are quantized (A4, weights float), end-to-end error vs float; plus
     all activations at A4, weight observers (min-max vs MSE) per kind at W4, and whole-model W4A4
     with each activation observer and with the best observer per kind.
  c  QuantFace recipe settings end to end at W4A4 (balance, rank ratio, per-kind observers) with a
     small QD-LoRA step budget, scored on the *test* faces.

Faces: calibration = training faces (benchmarks/common.py); the held-out faces are split into
*analysis* faces (the first --analysis-images: stages a and b, where settings are chosen) and *test*
faces (the rest: stage c, where the chosen settings are compared), so no choice is scored on the
faces it was made on.

    python benchmarks/w4a4_analysis.py [--stages a,b,c] [--layer-images 4] [--analysis-images 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import toolchain  # noqa: E402,F401
from benchmarks.common import CACHE, DEFAULT_FACES, RESULTS, command_line, environment, face_sets  # noqa: E402
from toolchain.calibration.dataset import CalibrationSet  # noqa: E402
from toolchain.defaults import DEFAULT_MODEL  # noqa: E402
from toolchain.eval.evaluate import restore_set, score  # noqa: E402
from toolchain.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from toolchain.methods import MethodContext  # noqa: E402
from toolchain.models import load_model  # noqa: E402
from toolchain.quant.api import quantize_  # noqa: E402
from toolchain.quant.calibrate import calibrate_activations, calibrate_weights, prepare_model, quant_layers  # noqa: E402
from toolchain.quant.config import QuantConfig  # noqa: E402
from toolchain.quant.kinds import layer_kind, parse_observer  # noqa: E402
from toolchain.quant.quantizer import FakeQuantizer  # noqa: E402

METRICS = ["psnr", "st_lpips"]
MODES = {"w4a4": (True, True), "a4": (False, True), "w4": (True, False)}  # (weights on, activations on)
ACT_OBSERVERS = ["minmax", "percentile:99.99", "percentile:99.9", "mse"]
W_OBSERVERS = ["minmax", "mse"]


def _score(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    s = score(out, ref, METRICS)
    return {k: round(float(s[k]), 5) for k in METRICS}


def _switch(model, on: dict[str, tuple[bool, bool]]) -> None:
    """Quantizer modes: layers in ``on`` get (weights on, activations on); every other layer is float."""
    for name, layer in quant_layers(model):
        w, a = on.get(name, (False, False))
        if layer.weight_quantizer is not None:
            layer.weight_quantizer.mode = "quantize" if w else "off"
        if layer.input_quantizer is not None:
            layer.input_quantizer.mode = "quantize" if a else "off"


def _start(names) -> int:
    """Earliest pipeline part any of ``names`` lives in: 0 encoder/embedder, 1 UNet, 2 decoder side."""
    def part(n: str) -> int:
        if n.startswith("unet."):
            return 1
        if n.startswith(("vae.decoder.", "vae.post_quant_conv")):
            return 2
        return 0
    return min((part(n) for n in names), default=2)


class Restorer:
    """Restores fixed LQ batches, skipping the float prefix of the pipeline.

    With only layers of a later part quantized, the encoder (and UNet) outputs equal the float
    model's, so they are computed once (quantizers off) and reused: same images as ``restore_set``
    at a fraction of the cost. Outputs in [0, 1], CPU."""

    def __init__(self, model, batches: list[torch.Tensor]):
        self.model, self.batches = model, batches
        saved = {id(q): q.mode for _, l in quant_layers(model) for q in (l.weight_quantizer, l.input_quantizer) if q is not None}
        _switch(model, {})
        with torch.no_grad():
            self.z = [model.encode(b) for b in batches]
            self.c = [model.prompt(b) for b in batches]
            self.x0 = [model.denoise(z, c) for z, c in zip(self.z, self.c)]
        for _, l in quant_layers(model):
            for q in (l.weight_quantizer, l.input_quantizer):
                if q is not None:
                    q.mode = saved[id(q)]

    def __call__(self, names) -> torch.Tensor:
        start, outs = _start(names), []
        with torch.no_grad():
            for b, z, c, x0 in zip(self.batches, self.z, self.c, self.x0):
                if start == 0:
                    y = self.model(b)
                else:
                    y = self.model.decode(self.model.denoise(z, c) if start == 1 else x0).clamp(-1.0, 1.0)
                outs.append(((y.float() + 1) / 2).clamp(0, 1))
        return torch.cat(outs)


def calibrated_w4a4(model_path: Path, calib: list[torch.Tensor], act_observer: str | dict[str, str] = "minmax",
                    w_observer: str = "minmax"):
    """The float model with every in-scope layer wrapped at W4A4 and calibrated (no transforms).

    ``act_observer``: one observer for all layers or a {kind: observer} map (missing kinds: min-max)."""
    model = load_model(model_path).eval()
    cfg = QuantConfig.for_bits("minmax", "w4a4")
    prepare_model(model, cfg)
    for name, layer in quant_layers(model):
        obs = act_observer if isinstance(act_observer, str) else act_observer.get(layer_kind(name), "minmax")
        layer.input_quantizer = FakeQuantizer(parse_observer(obs, cfg.activation))
        wq = layer.weight_quantizer
        layer.weight_quantizer = FakeQuantizer(parse_observer(w_observer, wq.spec), wq.scale.numel(), wq.axis)
    calibrate_weights(model)
    calibrate_activations(model, calib, desc=f"calibrating ({act_observer if isinstance(act_observer, str) else 'per kind'})")
    return model


def stage_a(model_path: Path, calib, lq, fp_out, layer_modes: list[str]) -> dict:
    model = calibrated_w4a4(model_path, calib)
    names = [n for n, _ in quant_layers(model)]
    kinds = {n: layer_kind(n) for n in names}
    run = Restorer(model, lq)
    probe = next(n for n in names if n.startswith("unet."))  # the shortcut must give restore_set's images
    _switch(model, {probe: (True, True)})
    if not torch.equal(run([probe]), restore_set(model, lq, desc="check")):
        raise SystemExit("error: the prefix-skipping restorer differs from the full forward pass")
    per_layer: dict[str, dict] = {}
    jobs = [(n, m) for n in names for m in layer_modes]
    for name, mode in tqdm(jobs, desc="a: each layer alone"):
        _switch(model, {name: MODES[mode]})
        per_layer.setdefault(name, {"kind": kinds[name]})[mode] = _score(run([name]), fp_out)
    per_kind: dict[str, dict] = {}
    for kind in tqdm(sorted(set(kinds.values())), desc="a: each kind alone"):
        members = [n for n in names if kinds[n] == kind]
        per_kind[kind] = {"layers": len(members)}
        for mode, sw in MODES.items():
            _switch(model, {n: sw for n in members})
            per_kind[kind][mode] = _score(run(members), fp_out)
    for mode, sw in MODES.items():
        _switch(model, {n: sw for n in names})
        per_kind.setdefault("ALL", {"layers": len(names)})[mode] = _score(run(names), fp_out)
    return {"per_layer": per_layer, "per_kind": per_kind}


def _kind_scores(model, run, names: list[str], switch: tuple[bool, bool], fp_out, rows: dict, column: str) -> None:
    """rows[kind][column] = score of the model with only ``kind``'s layers switched to ``switch`` (weights, activations)."""
    kinds = {n: layer_kind(n) for n in names}
    for kind in sorted(set(kinds.values())):
        members = [n for n in names if kinds[n] == kind]
        _switch(model, {n: switch for n in members})
        rows.setdefault(kind, {})[column] = _score(run(members), fp_out)


def stage_b(model_path: Path, calib, lq, fp_out) -> dict:
    kinds_rows: dict[str, dict] = {}
    whole: dict[str, dict] = {}
    for obs in tqdm(ACT_OBSERVERS, desc="b: activation observers"):
        model = calibrated_w4a4(model_path, calib, act_observer=obs)
        names = [n for n, _ in quant_layers(model)]
        _kind_scores(model, Restorer(model, lq), names, (False, True), fp_out, kinds_rows, obs)
        _switch(model, {n: (False, True) for n in names})
        kinds_rows.setdefault("ALL", {})[obs] = _score(restore_set(model, lq, desc=f"{obs} all A4"), fp_out)
        _switch(model, {n: (True, True) for n in names})
        whole[f"act {obs}"] = _score(restore_set(model, lq, desc=f"{obs} W4A4"), fp_out)
    w_rows: dict[str, dict] = {}
    for wobs in W_OBSERVERS:
        model = calibrated_w4a4(model_path, calib[:1], w_observer=wobs)  # activations unused here
        names = [n for n, _ in quant_layers(model)]
        _kind_scores(model, Restorer(model, lq), names, (True, False), fp_out, w_rows, wobs)
        _switch(model, {n: (True, False) for n in names})
        w_rows.setdefault("ALL", {})[wobs] = _score(restore_set(model, lq, desc=f"W {wobs} all"), fp_out)
    # best activation observer per kind by end-to-end PSNR vs float (the analysis faces)
    best = {k: max(v, key=lambda o: v[o]["psnr"]) for k, v in kinds_rows.items() if k != "ALL"}
    model = calibrated_w4a4(model_path, calib, act_observer=best)
    names = [n for n, _ in quant_layers(model)]
    _switch(model, {n: (False, True) for n in names})
    kinds_rows["ALL"]["best per kind"] = _score(restore_set(model, lq, desc="best A4"), fp_out)
    _switch(model, {n: (True, True) for n in names})
    whole["act best per kind"] = _score(restore_set(model, lq, desc="best W4A4"), fp_out)
    return {"act_per_kind": kinds_rows, "weight_per_kind": w_rows, "w4a4_whole": whole, "best_act_observer": best}


def recipe_settings(best_observers: dict[str, str], train_steps: int) -> dict[str, dict]:
    """Named QuantFace settings compared in stage c (all at W4A4, lr 1e-4 as in compare_ref)."""
    obs = [f"{k}={v}" for k, v in sorted(best_observers.items())]
    base = {"train_steps": train_steps, "lr": 1e-4}
    return {
        "paper (rotate-scale, rank 8+8, min-max)": {"recipe": "paper", **base},
        "rotate-scale, ratio 0.02": {"recipe": "paper", "rank_ratio": 0.02, **base},
        "auto, ratio 0.02": {"recipe": "paper", "balance": "auto", "rank_ratio": 0.02, **base},
        "auto, rank 8+8": {"recipe": "paper", "balance": "auto", **base},
        "auto, rank 8+8, best observers": {"recipe": "paper", "balance": "auto", "observers": obs, **base},
        "rotate-scale, rank 8+8, best observers": {"recipe": "paper", "observers": obs, **base},
        "auto, ratio 0.05, best observers": {"recipe": "paper", "balance": "auto", "rank_ratio": 0.05, "observers": obs, **base},
        "default recipe": {**base},
    }


def stage_c(model_path: Path, calib, lq, fp_out, hq, best_observers: dict[str, str], train_steps: int, work: Path,
            only: list[str] | None) -> dict:
    rows = {}
    cache = work / "stage_c_rows"
    cache.mkdir(parents=True, exist_ok=True)
    settings = recipe_settings(best_observers, train_steps)
    for label, params in tqdm(list(settings.items()), desc="c: QuantFace settings"):
        if only and label not in only:
            continue
        f = cache / (label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "").replace("+", "p") + ".json")
        if f.is_file():
            rows[label] = json.loads(f.read_text())
            continue
        model = load_model(model_path)
        t0 = time.perf_counter()
        try:
            summary = quantize_(model, QuantConfig.for_bits("quantface", "w4a4", params=params),
                                MethodContext(calib, workdir=work / "runs" / f.stem, log=lambda *_: None))
        except Exception as exc:  # a setting the code does not know yet (e.g. before 'recipe' existed)
            rows[label] = {"params": params, "error": f"{type(exc).__name__}: {exc}"}
            continue
        out = restore_set(model, lq, desc=label)
        row = {"params": params, "vs_fp": _score(out, fp_out), "vs_hq": _score(out, hq), "seconds": round(time.perf_counter() - t0, 1),
               "balance_modes": summary["balance"].get("modes"), "qdlora_loss_last": (summary.get("qdlora") or {}).get("loss_last_10pct")}
        atomic_write_json(f, row)
        rows[label] = row
    return rows


def plot(a: dict | None, b: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (a, b) if p]
    if not panels:
        return
    fig, axs = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5), squeeze=False)
    axes = list(axs[0]) if a else [None, axs[0][0]]
    if a:
        pl = a["per_layer"]
        names = list(pl)
        kinds = sorted({pl[n]["kind"] for n in names})
        cmap = plt.get_cmap("tab20")
        ax = axes[0]
        for i, k in enumerate(kinds):
            idx = [j for j, n in enumerate(names) if pl[n]["kind"] == k]
            ax.scatter(idx, [pl[names[j]]["w4a4"]["psnr"] for j in idx], s=14, color=cmap(i % 20), label=k)
        ax.set_xlabel("quantized layer (module order)")
        ax.set_ylabel("PSNR vs float output (dB), this layer alone at W4A4")
        ax.set_title("(a) per-layer error propagation")
        ax.legend(fontsize=7, ncol=2)
    if b:
        ax = axes[1]
        rows = b["act_per_kind"]
        kinds = [k for k in rows if k != "ALL"]
        width = 0.8 / len(ACT_OBSERVERS)
        for i, obs in enumerate(ACT_OBSERVERS):
            ax.bar(np.arange(len(kinds)) + i * width, [rows[k][obs]["psnr"] for k in kinds], width, label=obs)
        ax.set_xticks(np.arange(len(kinds)) + 0.4 - width / 2)
        ax.set_xticklabels(kinds, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("PSNR vs float output (dB), kind's activations alone at A4")
        ax.set_title("(b) activation observers per layer kind")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(res: dict, out: Path) -> str:
    L = ["# W4A4 analysis on the reference model\n", f"Command: `{res['command']}`  ",
         f"Device: {res['environment']['cpu']} ({res['environment']['threads']} threads, {res['environment']['cpu_count']} cores), "
         f"torch {res['environment']['torch']}, git {res['environment']['git']}  ", res["data"] + "\n"]
    a, b, c = res.get("a"), res.get("b"), res.get("c")
    if a:
        L += ["## (a) Each layer kind alone (others float), MinMax ranges, vs the float model's output\n",
              "| kind | layers | W4A4 PSNR | W4A4 ST-LPIPS | A4 only PSNR | A4 ST-LPIPS | W4 only PSNR | W4 ST-LPIPS |", "|---|---|---|---|---|---|---|---|"]
        for k, v in sorted(a["per_kind"].items(), key=lambda kv: kv[1]["w4a4"]["psnr"]):
            L.append(f"| {k} | {v['layers']} | {v['w4a4']['psnr']:.2f} | {v['w4a4']['st_lpips']:.4f} | {v['a4']['psnr']:.2f} | "
                     f"{v['a4']['st_lpips']:.4f} | {v['w4']['psnr']:.2f} | {v['w4']['st_lpips']:.4f} |")
        pl = a["per_layer"]
        top = sorted(pl, key=lambda n: pl[n]["w4a4"]["psnr"])[:15]
        L += ["\n### Top 15 offenders: one layer alone at W4A4\n", "| layer | kind | W4A4 PSNR | W4A4 ST-LPIPS | A4 only PSNR | W4 only PSNR |",
              "|---|---|---|---|---|---|"]
        for n in top:
            v = pl[n]
            cell = lambda m: f"{v[m]['psnr']:.2f}" if m in v else "–"  # noqa: E731
            L.append(f"| `{n}` | {v['kind']} | {v['w4a4']['psnr']:.2f} | {v['w4a4']['st_lpips']:.4f} | {cell('a4')} | {cell('w4')} |")
        if all("a4" in v and "w4" in v for v in pl.values()):
            a4_worse = sum(1 for v in pl.values() if v["a4"]["psnr"] < v["w4"]["psnr"])
            L.append(f"\nLayers where A4 alone costs more than W4 alone: {a4_worse} of {len(pl)}.")
        mse_db = {k: 10 * np.log10(sum(10 ** (-pl[n]["w4a4"]["psnr"] / 10) for n in pl if pl[n]["kind"] == k)) for k in {v["kind"] for v in pl.values()}}
        total = sum(10 ** (v / 10) for v in mse_db.values())
        L += ["\nShare of the summed single-layer output MSE (W4A4) by kind: " +
              ", ".join(f"{k} {100 * 10 ** (v / 10) / total:.0f} %" for k, v in sorted(mse_db.items(), key=lambda kv: -kv[1])) + "."]
    if b:
        L += ["\n## (b) Activation observers at A4, per kind (only that kind's activations quantized), PSNR vs float / ST-LPIPS\n",
              "| kind | " + " | ".join(ACT_OBSERVERS) + " | best |", "|---|" + "---|" * (len(ACT_OBSERVERS) + 1)]
        for k, v in b["act_per_kind"].items():
            cells = [f"{v[o]['psnr']:.2f} / {v[o]['st_lpips']:.4f}" for o in ACT_OBSERVERS]
            extra = b["best_act_observer"].get(k, f"{v['best per kind']['psnr']:.2f} / {v['best per kind']['st_lpips']:.4f} (best per kind)"
                                                   if "best per kind" in v else "")
            L.append(f"| {k} | " + " | ".join(cells) + f" | {extra} |")
        L += ["\nWeights at W4 per kind (only that kind's weights quantized):\n", "| kind | " + " | ".join(W_OBSERVERS) + " |",
              "|---|" + "---|" * len(W_OBSERVERS)]
        for k, v in b["weight_per_kind"].items():
            L.append(f"| {k} | " + " | ".join(f"{v[o]['psnr']:.2f} / {v[o]['st_lpips']:.4f}" for o in W_OBSERVERS) + " |")
        L += ["\nWhole model W4A4 (MinMax weights, no transforms) by activation observer:\n", "| activation observer | PSNR vs FP | ST-LPIPS vs FP |", "|---|---|---|"]
        for k, v in b["w4a4_whole"].items():
            L.append(f"| {k} | {v['psnr']:.2f} | {v['st_lpips']:.4f} |")
    if c:
        L += ["\n## (c) QuantFace W4A4 settings, test faces\n",
              f"QD-LoRA steps: {res.get('c_train_steps')}. Each row is cached in `--work` by the invocation that ran it "
              "(`--stages c --settings LABEL`); a later invocation reuses it.\n", "| setting | params | PSNR vs FP | ST-LPIPS vs FP | PSNR vs HQ | ST-LPIPS vs HQ | s |",
              "|---|---|---|---|---|---|---|"]
        for k, v in c.items():
            if "error" in v:
                L.append(f"| {k} | `{json.dumps(v['params'])}` | error: {v['error']} |||||")
                continue
            p = {kk: vv for kk, vv in v["params"].items() if kk not in ("train_steps", "lr")}
            L.append(f"| {k} | `{json.dumps(p)}` | {v['vs_fp']['psnr']:.2f} | {v['vs_fp']['st_lpips']:.4f} | {v['vs_hq']['psnr']:.2f} | "
                     f"{v['vs_hq']['st_lpips']:.4f} | {v['seconds']:.0f} |")
    if "fp_vs_hq" in res:
        L.append(f"\nFloat model vs HQ on the test faces: PSNR {res['fp_vs_hq']['psnr']:.2f} dB, ST-LPIPS {res['fp_vs_hq']['st_lpips']:.4f}; "
                 f"degraded input vs HQ: PSNR {res['lq_vs_hq']['psnr']:.2f} dB, ST-LPIPS {res['lq_vs_hq']['st_lpips']:.4f}.")
    if not a:
        L.append("\nStage (a), the per-layer sweep, has not been run into these results.")
    if not b:
        L.append("Stage (b), the observers per kind, has not been run into these results.")
    if a or b:  # plot() draws the per-layer and observer panels only
        L.append("\nPlot: `w4a4_analysis.png` (" + ("left: per-layer W4A4 PSNR vs float; right: " if a and b else
                                                      "per-layer W4A4 PSNR vs float" if a else "") + ("observers per kind" if b else "") + ").")
    text = "\n".join(L) + "\n"
    atomic_write_text(out / "results.md", text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=Path, default=DEFAULT_FACES)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--stages", default="a,b,c", help="comma-separated subset of a,b,c")
    ap.add_argument("--calib", type=int, default=64, help="calibration (training) faces")
    ap.add_argument("--heldout", type=int, default=64, help="held-out faces (analysis + test)")
    ap.add_argument("--analysis-images", type=int, default=16, help="held-out faces for stages a/b (the rest are test faces)")
    ap.add_argument("--layer-images", type=int, default=4, help="analysis faces used by the per-layer sweep (stage a)")
    ap.add_argument("--layer-modes", default="w4a4,a4,w4", help="stage a: modes of the per-layer sweep (kinds always get all three)")
    ap.add_argument("--train-steps", type=int, default=0, help="QD-LoRA steps per stage-c setting (batch 8)")
    ap.add_argument("--settings", default=None, help="stage c: semicolon-separated labels to run (default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS / "w4a4_analysis_ref")
    ap.add_argument("--work", type=Path, default=CACHE / "w4a4_analysis")
    args = ap.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if bad := [s for s in stages if s not in ("a", "b", "c")]:
        raise SystemExit(f"error: --stages: unknown stage(s) {', '.join(bad)} (use a, b, c)")
    if not 1 <= args.layer_images <= args.analysis_images < args.heldout:
        raise SystemExit(f"error: need 1 <= --layer-images ({args.layer_images}) <= --analysis-images ({args.analysis_images}) < --heldout ({args.heldout})")
    modes = [m.strip() for m in args.layer_modes.split(",") if m.strip()]
    if not modes or (bad := [m for m in modes if m not in MODES]):
        raise SystemExit(f"error: --layer-modes: use a comma-separated subset of {', '.join(MODES)}")
    torch.manual_seed(0)
    calib_dir, eval_dir = face_sets(args.faces, args.calib, args.heldout)
    calib = CalibrationSet.open(calib_dir).batches(128, 8)
    ev = CalibrationSet.open(eval_dir)
    ana_lq = ev.batches(128, 8, limit=args.analysis_images)
    layer_lq = ev.batches(128, 8, limit=args.layer_images)
    test_lq = ev.batches(128, 8, start=args.analysis_images)
    test_hq = (torch.cat(ev.batches(128, 8, start=args.analysis_images, which="hq")) + 1) / 2
    fp = load_model(args.model).eval()
    fp_ana, fp_layer, fp_test = (restore_set(fp, x, desc="float") for x in (ana_lq, layer_lq, test_lq))
    del fp
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    res_path = args.out / "results.json"
    res = json.loads(res_path.read_text()) if res_path.is_file() else {}
    res.update({"command": command_line(), "environment": environment(), "model": str(args.model),
                "data": (f"Calibration: {args.calib} training faces ({calib_dir.name}); held-out set {eval_dir.name}: faces 0–{args.analysis_images - 1} "
                         f"are analysis faces (stage a uses the first {args.layer_images}, stage b all {args.analysis_images}), faces "
                         f"{args.analysis_images}–{args.heldout - 1} are test faces (stage c). 128 px, CPU float32."),
                "fp_vs_hq": _score(fp_test, test_hq), "lq_vs_hq": _score((torch.cat(test_lq) + 1) / 2, test_hq)})
    for st in stages:
        cached = args.work / f"stage_{st}.json"
        fresh = st == "c" or not cached.is_file()
        t0 = time.perf_counter()
        if st == "a":
            res["a"] = json.loads(cached.read_text()) if cached.is_file() else stage_a(args.model, calib, layer_lq, fp_layer, modes)
        elif st == "b":
            res["b"] = json.loads(cached.read_text()) if cached.is_file() else stage_b(args.model, calib, ana_lq, fp_ana)
        else:
            best = (res.get("b") or {}).get("best_act_observer") or {}
            # rows of settings not run by this invocation stay as an earlier one recorded them
            res["c"] = {**(res.get("c") or {}), **stage_c(args.model, calib, test_lq, fp_test, test_hq, best, args.train_steps,
                                                          args.work, [x.strip() for x in args.settings.split(";")] if args.settings else None)}
            res["c_train_steps"] = args.train_steps
        if st in ("a", "b") and not cached.is_file():
            atomic_write_json(cached, res[st])
        if fresh:
            res.setdefault("seconds", {})[st] = round(time.perf_counter() - t0, 1)
        atomic_write_json(res_path, res)
        plot(res.get("a"), res.get("b"), args.out / "w4a4_analysis.png")
        print(report(res, args.out))


if __name__ == "__main__":
    main()
