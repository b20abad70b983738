"""``toolchain model import osdface``: the upstream OSDFace release → one of our model folders.

Inputs (UPSTREAM.md "Release layouts", OSDFace ``infer.py`` / ``lq_embed/``):

* ``--sd DIR``: SD-2.1-base diffusers folder (or a smaller folder with the same config fields);
* ``--vre associate_2.ckpt``: Lightning pickle, read with the restricted unpickler (state_dict only);
* ``--proj embedding_change_weights.pth``: the 1×1 projection (weights-only pickle or safetensors);
* ``--lora pytorch_lora_weights.safetensors``: UNet LoRA merged into the UNet weights at import.

Output: a model directory (``model_config.json`` + ``model.safetensors``, loadable by
``toolchain.models.load_model``) and ``import_report.json`` recording every source file's SHA-256,
the LoRA rank/α/scale and targets, the VRE widths and the counts of keys that were dropped. The
folder is written atomically. The one-step settings follow upstream: t = 399, ᾱ from the folder's
scheduler (float32 cumprod), latent scale from the VAE config.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from toolchain.errors import CheckpointError
from toolchain.io.convert import file_record
from toolchain.io.weights import check_finite, load_tensors
from toolchain.models.configs import ModelConfig
from toolchain.models.osdface import OSDFaceModel
from toolchain.models.release.lora import merge_lora, read_lora
from toolchain.models.release.sd_folder import read_sd_folder
from toolchain.models.release.vre import embedder_config, import_projection, import_vre
from toolchain.models.storage import known_unet_keys, known_vae_keys, save_model_dir

TIMESTEP = 399
REPORT_NAME = "import_report.json"


def _load(path: Path, flag: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} not found (given to {flag})")
    tensors = load_tensors(path)
    check_finite(tensors, f"{path} (given to {flag})")
    return tensors


def import_osdface(sd: str | os.PathLike, vre: str | os.PathLike, proj: str | os.PathLike, lora: str | os.PathLike,
                   out: str | os.PathLike, lora_alpha: float | None = None) -> dict[str, Any]:
    """Import the OSDFace release into a model directory at ``out``; returns the import report (also saved).

    The model computes, for an image x (B,3,S,S) in [-1,1] with S = UNet sample_size × VAE factor:
    z = mean(E(x))·scale, c = VRE(x) (B,77,cross_dim), ε = UNet(z, 399, c), x0 = (z − √(1−ᾱ)ε)/√ᾱ,
    D(x0/scale). Raises CheckpointError with one sentence naming the offending file.
    """
    sd, vre, proj, lora, out = Path(sd), Path(vre), Path(proj), Path(lora), Path(out)
    if lora.suffix != ".safetensors":
        raise CheckpointError(f"{lora}: --lora takes the LoRA .safetensors file (pytorch_lora_weights.safetensors)")
    parts = read_sd_folder(sd)
    vre_import = import_vre(_load(vre, "--vre"), str(vre))
    proj_tensors, hidden, cross = import_projection(_load(proj, "--proj"), vre_import.widths, str(proj))
    unet_cross = parts.unet_config.get("cross_attention_dim")
    if cross != unet_cross:
        raise CheckpointError(f"{proj}: the projection outputs {cross}-wide embeddings, the UNet in {sd} expects {unet_cross}")

    unet_state = dict(parts.unet_state)
    merge = merge_lora(unet_state, read_lora(_load(lora, "--lora"), "unet", str(lora)), str(lora), alpha=lora_alpha)

    unet_cfg, vae_cfg = known_unet_keys(parts.unet_config), known_vae_keys(parts.vae_config)
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    sample = unet_cfg.get("sample_size")
    if not isinstance(sample, int):
        raise CheckpointError(f"{sd / 'unet' / 'config.json'}: sample_size must be an integer to set the image size")
    alpha_bar = float(parts.alphas_cumprod[TIMESTEP])
    config = ModelConfig(name="osdface", image_size=sample * vae_factor, unet=unet_cfg, vae=vae_cfg,
                         embedder=embedder_config(vre_import.widths, hidden, cross), timestep=TIMESTEP, alpha_bar=alpha_bar,
                         latent_scaling=float(vae_cfg.get("scaling_factor", 0.18215)))

    state = {f"unet.{k}": v for k, v in unet_state.items()}
    state.update({f"vae.{k}": v for k, v in parts.vae_state.items()})
    state.update({f"embedder.{k}": v for k, v in {**vre_import.tensors, **proj_tensors}.items()})
    _check_against_architecture(config, state, sd)

    sources = {"sd": [file_record(p) for p in parts.files], "vre": file_record(vre), "proj": file_record(proj),
               "lora": file_record(lora)}
    report = {
        "kind": "osdface",
        "sources": sources,
        "lora": {"targets": merge.targets, "conv_targets": merge.conv_targets, "rank": merge.ranks, "alpha": merge.alphas,
                 "scale": merge.scales, "formula": "W += (alpha / rank) * B @ A"},
        "vre": {"widths": asdict(vre_import.widths), "release_tensors": vre_import.release_tensors,
                "release_params": vre_import.release_params, "unused_tensors": len(vre_import.unused),
                "dropped_keys": vre_import.filtered},
        "one_step": {"timestep": TIMESTEP, "alpha_bar": alpha_bar, "latent_scaling": config.latent_scaling,
                     "image_size": config.image_size, "vre_input_size": config.embedder.input_size},
    }
    save_model_dir(out, config, state, {REPORT_NAME: report})
    return report


def _check_against_architecture(config: ModelConfig, state: dict[str, torch.Tensor], sd: Path) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init time at SD-2.1 size
        expected = OSDFaceModel(config).state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise CheckpointError(f"{sd}: the imported tensors do not match the architecture its config.json files describe "
                              f"({len(missing)} missing, e.g. {missing[:1]}; {len(extra)} unexpected, e.g. {extra[:1]})")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{sd}: tensor {k} has shape {tuple(state[k].shape)}, the architecture expects {tuple(v.shape)}")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Human-readable lines for the CLI."""
    v, lo = report["vre"], report["lora"]
    dropped = ", ".join(f"{n} {cat}" for cat, n in sorted(v["dropped_keys"].items())) or "none"
    return [
        f"VRE: {v['release_tensors']} tensors ({v['release_params']:,} params; base width {v['widths']['ch']}), "
        f"{v['unused_tensors']} present but unused by upstream (attention norm2); dropped keys: {dropped}",
        f"LoRA: {lo['targets']} UNet targets ({lo['conv_targets']} conv), rank {lo['rank']}, alpha {lo['alpha']}, "
        f"merged with scale {lo['scale']}",
        f"one step: t={report['one_step']['timestep']}, alpha_bar={report['one_step']['alpha_bar']:.10f}, "
        f"image {report['one_step']['image_size']} px, VRE at {report['one_step']['vre_input_size']} px",
    ]
