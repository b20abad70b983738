"""Reading a Stable-Diffusion diffusers folder (``unet/``, ``vae/``, ``scheduler/``) for an importer.

Upstream OSDFace loads SD-2.1-base with ``from_pretrained`` and uses only the scheduler's
``alphas_cumprod`` (DDIMScheduler, float32 cumprod: ᾱ₃₉₉ = 0.4260861277580261 for SD-2.1). The
architecture comes from the folder's ``config.json`` files, so smaller SD-shaped folders import too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolchain.errors import CheckpointError
from toolchain.io.weights import check_finite


@dataclass
class SDParts:
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    unet_state: dict[str, torch.Tensor]
    vae_state: dict[str, torch.Tensor]
    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) float32, as diffusers' scheduler computes it
    files: list[Path]             # the weight and config files read (for the provenance record)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} not found: --sd must be a diffusers folder with unet/, vae/ and scheduler/")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def alphas_cumprod(cfg: dict[str, Any], where: Path) -> torch.Tensor:
    """ᾱ_t for t = 0…T−1 from a diffusers scheduler config, in float32 like diffusers (DDPM/DDIM).

    Supports ``scaled_linear`` (SD) and ``linear`` beta schedules; raises CheckpointError otherwise.
    """
    n = int(cfg.get("num_train_timesteps", 1000))
    start, end = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    elif kind == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float32)
    else:
        raise CheckpointError(f"{where}: beta_schedule '{kind}' is not supported (scaled_linear or linear)")
    return torch.cumprod(1.0 - betas, dim=0)


def _load_part(folder: Path, cls: Any) -> tuple[dict, dict[str, torch.Tensor], Path]:
    cfg_path = folder / "config.json"
    _read_json(cfg_path)
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, EnvironmentError) as exc:
        raise CheckpointError(f"cannot load {folder} as a diffusers {cls.__name__} ({str(exc).splitlines()[0][:200]})") from None
    weights = [p for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".bin")]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    check_finite(state, str(weights[0] if weights else folder))
    return dict(model.config), state, (weights[0] if weights else cfg_path)


def read_sd_folder(path: str | Path) -> SDParts:
    """Load the UNet and VAE weights/configs and the scheduler's ᾱ table of an SD diffusers folder.

    Raises CheckpointError naming the file or folder that is missing or unreadable.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder: --sd takes a diffusers Stable Diffusion folder (unet/, vae/, scheduler/)")
    sched_path = path / "scheduler" / "scheduler_config.json"
    ac = alphas_cumprod(_read_json(sched_path), sched_path)
    unet_cfg, unet_state, unet_file = _load_part(path / "unet", UNet2DConditionModel)
    vae_cfg, vae_state, vae_file = _load_part(path / "vae", AutoencoderKL)
    return SDParts(unet_cfg, vae_cfg, unet_state, vae_state, ac, [unet_file, vae_file, sched_path])
