"""Training the project's small OSDFace-shaped reference model on real faces.

Composition as OSDFace (VAE + UNet + visual prompt embedder, one-step x0 estimate at t=399),
trained from scratch end to end on degraded/clean face pairs made by the project's own
degradation pipeline. The loss keeps the parts meaningful, not just the end-to-end map:

    L = |x̂ − x_HQ|₁ + 0.5·ST-LPIPS(x̂, x_HQ)               restoration
      + |D(E(x_HQ)) − x_HQ|₁ + 0.25·ST-LPIPS(D(E(x_HQ)), x_HQ)  the VAE stays an autoencoder
      + 0.1·‖ẑ_H − sg(E(x_HQ))‖²                          the one-step estimate lands on HQ latents
      + VQ codebook/commitment loss                         the embedder's codebook is used

A deterministic slice of the faces (every ``holdout_every``-th file in sorted order) is never
trained on; it is the held-out set for every benchmark.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from toolchain.errors import ConfigError
from toolchain.eval.metrics import psnr, st_lpips
from toolchain.io.atomic import atomic_write_json, atomic_write_text
from toolchain.io.images import list_images
from toolchain.models.configs import preset
from toolchain.models.osdface import OSDFaceModel, build_model
from toolchain.models.storage import save_model
from toolchain.train.data import FaceDegradationBatches, PrefetchedSteps, load_faces
from toolchain.train.trainer import TrainConfig, Trainer, plot_loss_curve


@dataclass
class ReferenceTrainingArgs:
    faces: Path
    out: Path
    workdir: Path
    preset: str = "ref"
    steps: int = 8000
    batch_size: int = 32
    lr: float = 2e-4
    seed: int = 0
    holdout_every: int = 10
    workers: int = 0
    checkpoint_every: int = 500
    device: str = "cpu"
    eval_images: int = 64
    max_minutes: float | None = None
    # train until held-out quality stops improving: every ``eval_every`` steps score the PSNR of
    # ``val_faces`` validation faces (taken from the training split, never trained on, disjoint from
    # the held-out benchmark faces); stop after ``patience`` scores without a gain > ``min_delta`` dB
    val_faces: int = 0
    eval_every: int = 0
    patience: int = 0
    min_delta: float = 0.02


def split_faces(folder: Path, holdout_every: int, val_faces: int = 0) -> tuple[list[Path], list[Path], list[Path]]:
    """(train, held-out, validation) face files of ``folder``, deterministic in the sorted file names.

    Held out: every ``holdout_every``-th file (the benchmark faces, never trained on). Validation:
    ``val_faces`` files spread evenly over the rest (for stopping on a plateau; not trained on either).
    Raises ConfigError when the folder has too few faces for the split.
    """
    files = sorted(list_images([folder]), key=lambda p: p.name)
    held = [p for i, p in enumerate(files) if i % holdout_every == 0]
    rest = [p for i, p in enumerate(files) if i % holdout_every != 0]
    if val_faces < 0 or val_faces >= len(rest):
        raise ConfigError(f"--val-faces {val_faces}: {folder} has {len(rest)} faces outside the held-out set")
    val_idx = set(round(j * len(rest) / val_faces) for j in range(val_faces)) if val_faces else set()
    val = [p for i, p in enumerate(rest) if i in val_idx]
    train = [p for i, p in enumerate(rest) if i not in val_idx]
    return train, held, val


def reference_losses(model: OSDFaceModel, lq: torch.Tensor, hq: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    z_l = model.encode(lq)
    z_hq = model.encode(hq)
    x0 = model.denoise(z_l, model.prompt(lq))
    out = model.decode(x0)
    rec = model.decode(z_hq)
    l_restore = F.l1_loss(out, hq) + 0.5 * st_lpips((out.clamp(-1, 1) + 1) / 2, (hq + 1) / 2).mean()
    l_ae = F.l1_loss(rec, hq) + 0.25 * st_lpips((rec.clamp(-1, 1) + 1) / 2, (hq + 1) / 2).mean()
    l_latent = 0.1 * F.mse_loss(x0, z_hq.detach())
    l_vq = model.embedder.vq_losses(lq)
    loss = l_restore + l_ae + l_latent + l_vq
    return loss, {k: float(v.detach()) for k, v in (("restore", l_restore), ("autoencoder", l_ae), ("latent", l_latent), ("vq", l_vq))}


def train_reference(a: ReferenceTrainingArgs) -> dict[str, Any]:
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = preset(a.preset)
    if a.eval_every and not a.val_faces:
        raise ConfigError("--eval-every needs --val-faces (the validation faces it scores)")
    train_files, held_files, val_files = split_faces(a.faces, a.holdout_every, a.val_faces)
    a.workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.workdir / "split.json", {"holdout_every": a.holdout_every, "train": [p.name for p in train_files],
                                                 "heldout": [p.name for p in held_files], "validation": [p.name for p in val_files]})
    faces = load_faces(train_files, cfg.image_size)
    model = build_model(cfg, seed=a.seed).to(device).train()
    params = {k: p for k, p in model.named_parameters()}
    batches = PrefetchedSteps(FaceDegradationBatches(faces, a.batch_size, a.seed), a.steps, a.workers)

    def loss_fn(step: int, batch):
        lq, hq = (t.to(device, non_blocking=True) for t in batch)
        return reference_losses(model, lq, hq)

    validate = None
    if a.eval_every:
        val_lq, val_hq = degraded_pairs(val_files, cfg.image_size, a.seed + 20_000)

        def validation_psnr() -> float:
            """Mean PSNR (dB) of the restored validation faces vs HQ."""
            return float(psnr(restore_batched(model, val_lq, device), val_hq).mean())

        validate = validation_psnr

    tcfg = TrainConfig(steps=a.steps, lr=a.lr, weight_decay=1e-4, seed=a.seed, checkpoint_every=a.checkpoint_every,
                       lr_schedule="cosine", warmup=min(200, a.steps // 10), max_seconds=a.max_minutes * 60 if a.max_minutes else None,
                       eval_every=a.eval_every, patience=a.patience, min_delta=a.min_delta)
    trainer = Trainer(params, loss_fn, batches, a.workdir, tcfg, device, desc="train-reference", validate=validate)
    t0 = time.perf_counter()
    history = trainer.run()
    train_seconds = time.perf_counter() - t0
    best_step = trainer.restore_best()  # the best-validated weights are the model (None without validation)
    plot_loss_curve(history, a.workdir / "loss_curve.png", f"{cfg.name} reference model")
    model.eval()
    quality = heldout_quality(model, held_files[: a.eval_images], cfg.image_size, a.seed, device)
    save_model(model.cpu(), a.out, "file", dtype=torch.float16)
    info = {
        "preset": cfg.name, "image_size": cfg.image_size, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "train_seconds_this_session": round(train_seconds, 1), "steps_done": trainer.step,
        "train_faces": len(train_files), "heldout_faces": len(held_files), "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "heldout_quality": quality, "final_loss": history[-1] if history else None,
        "validation": {"faces": len(val_files), "eval_every": a.eval_every, "patience": a.patience, "min_delta_db": a.min_delta,
                       "best_step": best_step, "stopped_on_plateau": trainer.stopped_early,
                       "history": trainer.val_history} if a.eval_every else None,
    }
    atomic_write_json(a.workdir / "training_info.json", info)
    return info


def degraded_pairs(files: list[Path], size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(LQ, HQ) float32 (N, 3, size, size) tensors in [0, 1]: each face degraded once with ``seed``."""
    from toolchain.calibration.degrade import degrade

    lq_all, hq_all = [], []
    for i, f in enumerate(load_faces(files, size)):
        hq = f.astype("float32") / 255.0
        lq, _ = degrade(hq, seed, i)
        lq_all.append(torch.from_numpy(lq).permute(2, 0, 1)[None].float())
        hq_all.append(torch.from_numpy(hq).permute(2, 0, 1)[None])
    return torch.cat(lq_all), torch.cat(hq_all)


def restore_batched(model: OSDFaceModel, lq: torch.Tensor, device: torch.device, batch: int = 32) -> torch.Tensor:
    """The model's float32 output in [0, 1] for LQ images in [0, 1] (N, 3, H, W), in eval mode, on CPU."""
    was_training = model.training
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, lq.shape[0], batch):
            outs.append((model(lq[i:i + batch].to(device) * 2 - 1).float().cpu() + 1) / 2)
    model.train(was_training)
    return torch.cat(outs)


def heldout_quality(model: OSDFaceModel, files: list[Path], size: int, seed: int, device: torch.device) -> dict[str, float]:
    """PSNR / ST-LPIPS vs HQ of the degraded input and of the restored output, on held-out faces (degradation
    seed ``seed + 10000``; one image per forward pass)."""
    lq_t, hq_t = degraded_pairs(files, size, seed + 10_000)
    out_t = restore_batched(model, lq_t, device, batch=1)
    return {
        "images": len(files),
        "lq_psnr": float(psnr(lq_t, hq_t).mean()), "lq_st_lpips": float(st_lpips(lq_t, hq_t).mean()),
        "fp_psnr": float(psnr(out_t, hq_t).mean()), "fp_st_lpips": float(st_lpips(out_t, hq_t).mean()),
    }


def _stopping_row(info: dict[str, Any]) -> str:
    v = info.get("validation")
    if not v:
        return ""
    best = max(v["history"], key=lambda h: h["score"]) if v["history"] else None
    how = "stopped on the plateau" if v["stopped_on_plateau"] else "schedule or time budget ended first"
    kept = f"weights of step {v['best_step']} kept ({best['score']:.2f} dB)" if best else "no score recorded"
    return (f"\n| stopping | validation PSNR of {v['faces']} faces (from the training split, never trained on) every "
            f"{v['eval_every']} steps, patience {v['patience']}, min gain {v['min_delta_db']} dB: {how}; {kept} |")


def write_model_card(info: dict[str, Any], path: Path) -> Path:
    q = info["heldout_quality"]
    text = f"""# Reference model `{info['preset']}` — model card

An OSDFace-shaped one-step face-restoration network (diffusers `AutoencoderKL` + `UNet2DConditionModel`
+ visual prompt embedder with a VQ codebook; one-step x0 estimate at t = 399), trained from scratch by
`toolchain train-reference` so that quantization methods can be compared on a *trained* network with real
activation statistics. It is a research stand-in, not OSDFace: small, {info['image_size']}×{info['image_size']}, trained for minutes.

| | |
|---|---|
| parameters | {info['params_M']} M (stored as float16, loaded as float32) |
| input | {info['image_size']}×{info['image_size']} RGB face, [-1, 1] |
| data | UTKFace aligned & cropped (subset in `../shared/assets/faces/utkface`, non-commercial research licence; not redistributed here): {info['train_faces']} training faces; every {info.get('holdout_every', 10)}th file in name order ({info['heldout_faces']} faces) held out and never used for training or calibration |
| degradations | `toolchain.calibration.degrade` second-order pipeline (blur → downsample → noise → JPEG, twice), a fresh draw per sample, seeded by step |
| training | {info.get('steps_done', info['steps'])} of {info['steps']} scheduled steps, batch {info['batch_size']}, AdamW lr {info['lr']} cosine, bf16 autocast, seed {info['seed']} |
| device / time | {info['device']}, {info.get('train_seconds_total', info['train_seconds_this_session'])} s of training |{_stopping_row(info)}
| loss | L1 + 0.5·ST-LPIPS (restoration) + L1 + 0.25·ST-LPIPS (VAE reconstruction) + 0.1·latent MSE + VQ |

## Held-out quality ({q['images']} faces, degradation seed {info['seed'] + 10000})

| | PSNR (dB) ↑ | ST-LPIPS ↓ |
|---|---|---|
| degraded input (LQ) | {q['lq_psnr']:.2f} | {q['lq_st_lpips']:.4f} |
| restored by this model (FP32) | {q['fp_psnr']:.2f} | {q['fp_st_lpips']:.4f} |

ST-LPIPS is the shift-tolerant LPIPS (AlexNet) shipped in the `stlpips-pytorch` wheel; its values are not
comparable with published LPIPS. The training command, loss curve and split are in `benchmarks/results/reference_model/`.
"""
    return atomic_write_text(path, text)
