"""Saving and loading OSDFace-shaped models.

Three on-disk forms are accepted:

* a **single safetensors file** whose metadata carries the model config
  (``toolchain_model_config``); keys are prefixed ``unet.``, ``vae.``, ``embedder.``;
* a **model directory** with ``model_config.json`` and ``model.safetensors``;
* a **diffusers-format folder** (``unet/``, ``vae/``, ``embedder/`` each with ``config.json`` and
  weights, plus ``toolchain_model.json`` for the one-step settings). A plain SD folder without
  the embedder loads with ``preset=...`` supplying the missing parts.

Pickle checkpoints are read only through ``toolchain.io.weights`` (weights_only=True).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from toolchain.errors import CheckpointError
from toolchain.io.atomic import atomic_directory, atomic_write_json
from toolchain.io.weights import check_finite, load_tensors, read_safetensors_metadata, save_tensors
from toolchain.models.configs import EmbedderConfig, ModelConfig, preset
from toolchain.models.osdface import OSDFaceModel, build_model

CONFIG_KEY = "toolchain_model_config"
PARTS = ("unet", "vae", "embedder")


def save_model_dir(path: str | os.PathLike, config: ModelConfig, state: dict[str, torch.Tensor], extra_json: dict[str, Any] | None = None) -> Path:
    """Write a model folder atomically: ``model_config.json`` + ``model.safetensors`` (config also in its
    metadata) and any ``extra_json`` files (name → JSON document, e.g. an import report)."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        atomic_write_json(tmp / "model_config.json", config.to_dict())
        save_tensors(tmp / "model.safetensors", state, metadata={CONFIG_KEY: json.dumps(config.to_dict())})
        for name, doc in (extra_json or {}).items():
            atomic_write_json(tmp / name, doc)
    return path


def save_model(model: OSDFaceModel, path: str | os.PathLike, fmt: str = "file", dtype: torch.dtype | None = None) -> Path:
    """Save ``model`` as ``fmt`` = "file" (one .safetensors), "dir" or "diffusers"."""
    path = Path(path)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    cfg_json = json.dumps(model.config.to_dict())
    if fmt == "file":
        if path.suffix != ".safetensors":
            raise CheckpointError(f"a single-file model must end in .safetensors: {path}")
        return save_tensors(path, state, metadata={CONFIG_KEY: cfg_json})
    if fmt == "dir":
        return save_model_dir(path, model.config, state)
    if fmt == "diffusers":
        if model.config.kind != "osdface":
            raise CheckpointError(f"the diffusers-folder format holds osdface models only; save this {model.config.kind} model as file or dir")
        with atomic_directory(path) as tmp:
            for part in PARTS:
                sub = {k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(part + ".")}
                part_cfg = _part_config(model.config, part)
                atomic_write_json(tmp / part / "config.json", part_cfg)
                fname = "model.safetensors" if part == "embedder" else "diffusion_pytorch_model.safetensors"
                save_tensors(tmp / part / fname, sub)
            onestep = {k: v for k, v in model.config.to_dict().items() if k not in ("unet", "vae", "embedder")}
            atomic_write_json(tmp / "toolchain_model.json", onestep)
            atomic_write_json(tmp / "model_index.json", {"_class_name": "OSDFacePipeline", "_toolchain": "quantface-toolchain",
                                                         "unet": ["diffusers", "UNet2DConditionModel"],
                                                         "vae": ["diffusers", "AutoencoderKL"],
                                                         "embedder": ["toolchain", "VisualPromptEmbedder"]})
        return path
    raise CheckpointError(f"unknown model format '{fmt}' (file, dir, diffusers)")


def _part_config(cfg: ModelConfig, part: str) -> dict:
    if part == "embedder":
        return cfg.to_dict()["embedder"]
    if part == "unet":
        return {"_class_name": "UNet2DConditionModel", **cfg.unet}
    return {"_class_name": "AutoencoderKL", **cfg.vae}


def load_model(path: str | os.PathLike, preset_name: str | None = None, dtype: torch.dtype = torch.float32) -> OSDFaceModel:
    """Load a model from any of the supported forms; raises CheckpointError with the reason."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model not found: {path}")
    if path.is_file():
        cfg = _config_from_file(path, preset_name)
        return _instantiate(cfg, load_tensors(path), str(path), dtype)
    if (path / "model_config.json").is_file() and (path / "model.safetensors").is_file():
        cfg = ModelConfig.from_dict(_read_json(path / "model_config.json"))
        return _instantiate(cfg, load_tensors(path / "model.safetensors"), str(path), dtype)
    if (path / "unet").is_dir() and (path / "vae").is_dir():
        return _load_diffusers_folder(path, preset_name, dtype)
    raise CheckpointError(
        f"{path} is not a model: expected a .safetensors file, a folder with model_config.json + model.safetensors, "
        "or a diffusers folder with unet/ and vae/"
    )


def model_config(path: str | os.PathLike, preset_name: str | None = None) -> ModelConfig:
    """The ModelConfig of a model file or model directory without loading its weights (a diffusers folder,
    which carries no kind, is built as ``load_model`` would: its weights are read). Raises CheckpointError."""
    path = Path(path)
    if path.is_file():
        return _config_from_file(path, preset_name)
    if (path / "model_config.json").is_file():
        return ModelConfig.from_dict(_read_json(path / "model_config.json"))
    return load_model(path, preset_name).config


def _config_from_file(path: Path, preset_name: str | None) -> ModelConfig:
    if path.suffix == ".safetensors":
        meta = read_safetensors_metadata(path)
        if CONFIG_KEY in meta:
            try:
                cfg = json.loads(meta[CONFIG_KEY])
            except (TypeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{path}: its '{CONFIG_KEY}' metadata is not JSON ({exc})") from None
            if not isinstance(cfg, dict):
                raise CheckpointError(f"{path}: its '{CONFIG_KEY}' metadata must be a JSON object, not {type(cfg).__name__}")
            return ModelConfig.from_dict(cfg)
    if preset_name is None:
        raise CheckpointError(f"{path} carries no model config; pass --preset to say which architecture it holds")
    return preset(preset_name)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__ if data is not None else 'null'}")
    return data


def _weights_in(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"no weights file (diffusion_pytorch_model.safetensors) in {folder}")


def _load_diffusers_folder(path: Path, preset_name: str | None, dtype: torch.dtype) -> OSDFaceModel:
    base = preset(preset_name) if preset_name else None
    unet_cfg = {k: v for k, v in _read_json(path / "unet" / "config.json").items() if not k.startswith("_")}
    vae_cfg = {k: v for k, v in _read_json(path / "vae" / "config.json").items() if not k.startswith("_")}
    extra = _read_json(path / "toolchain_model.json") if (path / "toolchain_model.json").is_file() else None
    if (path / "embedder" / "config.json").is_file():
        emb = EmbedderConfig(**_read_json(path / "embedder" / "config.json"))
    elif base is not None:
        emb = base.embedder
    else:
        raise CheckpointError(f"{path} has no embedder/ folder; pass --preset osdface to build the embedder and load its weights separately")
    if extra is None and base is None:
        raise CheckpointError(f"{path} has no toolchain_model.json; pass --preset to give image size and timestep")
    one = extra or {k: v for k, v in base.to_dict().items() if k not in ("unet", "vae", "embedder")}
    cfg = ModelConfig(name=one["name"], image_size=one["image_size"], unet=known_unet_keys(unet_cfg), vae=known_vae_keys(vae_cfg),
                      embedder=emb, timestep=one["timestep"], alpha_bar=one["alpha_bar"], latent_scaling=one["latent_scaling"])
    state: dict[str, torch.Tensor] = {}
    for part in PARTS:
        folder = path / part
        if part == "embedder" and not folder.is_dir():
            continue
        state.update({f"{part}.{k}": v for k, v in load_tensors(_weights_in(folder)).items()})
    strict = (path / "embedder").is_dir()
    return _instantiate(cfg, state, str(path), dtype, strict=strict)


def known_unet_keys(cfg: dict) -> dict:
    """The entries of a diffusers UNet config.json that UNet2DConditionModel's constructor accepts."""
    import inspect

    from diffusers import UNet2DConditionModel

    allowed = set(inspect.signature(UNet2DConditionModel.__init__).parameters)
    return {k: v for k, v in cfg.items() if k in allowed}


def known_vae_keys(cfg: dict) -> dict:
    """The entries of a diffusers VAE config.json that AutoencoderKL's constructor accepts."""
    import inspect

    from diffusers import AutoencoderKL

    allowed = set(inspect.signature(AutoencoderKL.__init__).parameters)
    return {k: v for k, v in cfg.items() if k in allowed}


def _instantiate(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str, dtype: torch.dtype, strict: bool = True) -> OSDFaceModel:
    check_finite(state, where)
    model = build_model(cfg, seed=0)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and (strict or not k.startswith("embedder."))]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"{where} does not match the '{cfg.name}' architecture: " + ", ".join(detail))
    for name, tensor in state.items():
        if expected[name].shape != tensor.shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(tensor.shape)}, the architecture expects {tuple(expected[name].shape)}")
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    return model.to(dtype).eval()
