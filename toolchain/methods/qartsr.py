"""QArtSR baseline: timestep retraining quantization (TRQ) and reversed per-module quantization (RPQ).

TRQ treats the one-step timestep as a parameter of the quantized model. QArtSR retrains the
float one-step model at a better timestep before quantizing; here (post-training, no FP
retraining) the timestep fed to the UNet's time embedding is swept: for each candidate the
activations are recalibrated and the quantized output is compared with the float model's output
at its trained timestep. The x0 coefficients (ᾱ) stay those of the trained timestep unless
``trq_scope="schedule"``. The best candidate is kept and the sweep is reported (JSON + plot).

RPQ calibrates learnable step sizes (LSQ: per-channel weight scales and per-tensor activation
scales) module by module from the output side back to the input side (decoder blocks first,
encoder last), each on its module's output error against the float model plus an image loss,
then runs a short end-to-end stage over all step sizes. Only quantization parameters train.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.eval.metrics import psnr_from_mse
from toolchain.methods.common import frozen_copy
from toolchain.quant.registry import MethodContext, QuantMethod, register_method
from toolchain.quant.calibrate import calibrate_activations, calibrate_weights, prepare_model, quant_layers
from toolchain.quant.config import QuantConfig
from toolchain.quant.learnable import activation_quantizers, freeze_step_sizes, weight_quantizers
from toolchain.quant.units import capture_outputs, reconstruction_units, tensors_of, to_cpu
from toolchain.train.fit import fit


def set_timestep(model: nn.Module, t: int, scope: str) -> None:
    """Run the model at timestep ``t``: the UNet's conditioning, and with scope "schedule" also ᾱ_t."""
    from toolchain.models.configs import sd_alpha_bar

    model.config.timestep = int(t)
    model.timestep.fill_(int(t))
    if scope == "schedule":
        model.config.alpha_bar = sd_alpha_bar(int(t))


def _mse(outputs: Any, targets: Any, device: torch.device) -> torch.Tensor:
    pairs = list(zip(tensors_of(outputs), tensors_of(targets)))
    return sum(F.mse_loss(o.float(), t.to(device).float()) for o, t in pairs) / len(pairs)


@dataclass
class QArtSRParams:
    timestep_offsets: tuple[int, ...] = (-200, -100, -50, 0, 50, 100, 200)  # TRQ candidates around the trained timestep
    trq_scope: str = "embedding"  # embedding | schedule | off
    sweep_batches: int = 4
    steps_per_module: int = 16
    e2e_steps: int = 64
    image_weight: float = 1.0  # weight of the image loss beside each module's own loss
    lr: float = 1e-4
    learn_weight_scales: bool = True
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        self.timestep_offsets = tuple(int(o) for o in self.timestep_offsets)
        if self.trq_scope not in ("embedding", "schedule", "off"):
            raise ValueError("trq_scope must be embedding, schedule or off")
        if self.steps_per_module < 0 or self.e2e_steps < 0 or self.sweep_batches < 1:
            raise ValueError("steps must be >= 0 and sweep_batches >= 1")


@register_method
class QArtSR(QuantMethod):
    name = "qartsr"
    Params = QArtSRParams
    summary_doc = "timestep sweep of the quantized model (TRQ) + LSQ step sizes calibrated module by module in reverse, then end-to-end (RPQ)"

    def apply(self, model, config: QuantConfig, ctx: MethodContext) -> dict[str, Any]:
        p = self.params
        fp_model = frozen_copy(model)
        with torch.no_grad():
            fp_images = [fp_model(b.to(ctx.device)).cpu() for b in ctx.lq_batches]
        names = prepare_model(model, config)
        calibrate_weights(model)
        summary: dict[str, Any] = {"quantized_layers": len(names)}
        if p.trq_scope != "off":
            summary["trq"] = self._timestep_sweep(model, fp_images, ctx)
        calibrate_activations(model, ctx.lq_batches, state_dir=ctx.state_dir("calib"))
        summary["rpq"] = self._reversed_modules(model, fp_model, fp_images, ctx)
        summary["learned_step_sizes"] = freeze_step_sizes(model)
        return summary

    def _timestep_sweep(self, model, fp_images: list[torch.Tensor], ctx: MethodContext) -> dict[str, Any]:
        p = self.params
        t0, a0 = int(model.config.timestep), float(model.config.alpha_bar)
        batches = ctx.lq_batches[: p.sweep_batches]
        rows = []
        for off in p.timestep_offsets:
            t = t0 + off
            if not 0 <= t < 1000:
                continue
            set_timestep(model, t, p.trq_scope)
            calibrate_activations(model, batches, desc=f"TRQ t={t}")
            with torch.no_grad():
                err = sum(float(F.mse_loss(model(b.to(ctx.device)).cpu(), fp_images[i])) for i, b in enumerate(batches)) / len(batches)
            rows.append({"timestep": t, "mse_vs_fp": err, "psnr_vs_fp": psnr_from_mse(max(err, 1e-12), data_range=2.0)})
            model.config.alpha_bar = a0
        best = min(rows, key=lambda r: r["mse_vs_fp"])
        set_timestep(model, best["timestep"], p.trq_scope)
        if ctx.workdir is not None:
            _plot_sweep(rows, t0, Path(ctx.workdir) / "trq_timestep_sweep.png")
        return {"trained_timestep": t0, "chosen_timestep": best["timestep"], "scope": p.trq_scope, "sweep": rows}

    def _reversed_modules(self, model, fp_model, fp_images: list[torch.Tensor], ctx: MethodContext) -> dict[str, Any]:
        p = self.params
        layers = dict(quant_layers(model))
        for prm in model.parameters():
            prm.requires_grad_(False)
        quantizers = activation_quantizers(list(layers.values())) + (weight_quantizers(list(layers.values())) if p.learn_weight_scales else [])
        for q in quantizers:
            q.make_learnable()
        n = len(ctx.lq_batches)
        modules: dict[str, Any] = {}
        units = list(reversed(reconstruction_units(model)))
        for u, unit in enumerate(units):
            targets = []
            with torch.no_grad():
                for b in ctx.lq_batches:
                    with capture_outputs(fp_model, [unit.name]) as seen:
                        fp_model(b.to(ctx.device))
                    targets.append(to_cpu(seen[unit.name]))
            params = {}
            for k in unit.layers:
                for side in ("input_quantizer", "weight_quantizer"):
                    q = getattr(layers[k], side)
                    if q is not None and isinstance(q.scale, nn.Parameter):
                        params[f"{k}.{side}.scale"] = q.scale

            def loss_fn(step: int, batch: tuple[torch.Tensor, ...], unit=unit) -> tuple[torch.Tensor, dict[str, float]]:
                lq, fp_image, *target = batch  # (this rank's rows of) the LQ images, FP images, FP module outputs
                with capture_outputs(model, [unit.name]) as seen:
                    image = model(lq.to(ctx.device))
                module_loss = _mse(seen[unit.name], target, ctx.device)
                image_loss = F.mse_loss(image, fp_image.to(ctx.device))
                return module_loss + p.image_weight * image_loss, {"module": float(module_loss.detach()), "image": float(image_loss.detach())}

            # every tensor is laid out by sample and both losses are means over the samples: under torchrun
            # each rank trains on its rows of every batch
            res = fit(params, loss_fn, n, p.steps_per_module if params else 0, p.lr, ctx.seed + u, ctx.device,
                      ctx.state_dir(f"rpq{u:03d}"), f"QArtSR RPQ {unit.name}", checkpoint_every=p.checkpoint_every,
                      batches=lambda i, targets=targets: (ctx.lq_batches[i], fp_images[i], *tensors_of(targets[i])))
            res.pop("history", None)
            modules[unit.name] = res
        all_params = {f"q{i}.scale": q.scale for i, q in enumerate(quantizers)}

        def e2e_loss(step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            return F.mse_loss(model(batch[0].to(ctx.device)), batch[1].to(ctx.device)), {}

        e2e = fit(all_params, e2e_loss, n, p.e2e_steps, p.lr, ctx.seed, ctx.device, ctx.state_dir("rpq_e2e"), "QArtSR end-to-end",
                  checkpoint_every=p.checkpoint_every, batches=lambda i: (ctx.lq_batches[i], fp_images[i]))
        return {"order": [u.name for u in units], "modules": modules, "end_to_end": e2e}


def _plot_sweep(rows: list[dict[str, Any]], t0: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toolchain.io.atomic import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["timestep"] for r in rows], [r["psnr_vs_fp"] for r in rows], "o-")
    ax.axvline(t0, color="grey", ls="--", lw=1, label=f"trained t={t0}")
    ax.set_xlabel("timestep fed to the quantized model")
    ax.set_ylabel("PSNR vs FP output (dB)")
    ax.set_title("QArtSR TRQ: timestep sweep")
    ax.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
