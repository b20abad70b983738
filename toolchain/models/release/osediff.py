"""``toolchain model import osediff``: the upstream OSEDiff release → one of our model folders.

Upstream (cswry/OSEDiff ``osediff.py``: ``save_model`` / ``OSEDiff_test.load_ckpt``; UPSTREAM.md
"Release layouts"): ``osediff.pkl`` is ``torch.save(dict)`` with

* ``unet_lora_{encoder,decoder,others}_modules`` and ``vae_lora_encoder_modules``: full module names,
  the targets of peft adapters ``default_encoder`` / ``default_decoder`` / ``default_others``;
* ``rank_unet``, ``rank_vae``;
* ``state_dict_unet``: ``<module>.lora_{A,B}.<adapter>.weight`` plus ``conv_in.base_layer.{weight,bias}``
  (conv_in was fully fine-tuned: it replaces SD's before its own LoRA is merged);
* ``state_dict_vae``: ``<module>.lora_{A,B}.default_encoder.weight``.

The LoraConfigs never set ``lora_alpha``, so peft's default α = 8 applies: scale = 8 / r (2.0 at the
training scripts' r = 4); the rank is read from the file and checked against ``rank_unet``/``rank_vae``.
The prompt is a constant embedding file (DAPE + CLIP are not available offline), t = 999, ×4 upscale.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from toolchain.errors import CheckpointError
from toolchain.io.convert import file_record
from toolchain.io.weights import check_finite, load_tensors
from toolchain.models.configs import ModelConfig
from toolchain.models.osediff import OSEDiffModel
from toolchain.models.release.lora import LoraPair, merge_lora
from toolchain.models.release.sd_folder import read_sd_folder
from toolchain.models.storage import known_unet_keys, known_vae_keys, save_model_dir

TIMESTEP = 999
UPSCALE = 4
PEFT_DEFAULT_ALPHA = 8.0
REPORT_NAME = "import_report.json"
_UNET_LISTS = {"default_encoder": "unet_lora_encoder_modules", "default_decoder": "unet_lora_decoder_modules",
               "default_others": "unet_lora_others_modules"}
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[A-Za-z0-9_]+)\.weight$")
_REQUIRED = ("vae_lora_encoder_modules", *_UNET_LISTS.values(), "rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae")


def read_osediff_pkl(path: Path) -> dict[str, Any]:
    """Load ``osediff.pkl`` with ``torch.load(weights_only=True)`` (it holds only lists, ints and tensors).

    Raises CheckpointError naming ``path`` when it is unsafe, unreadable or lacks a field.
    """
    if not path.is_file():
        raise CheckpointError(f"{path} not found (given to --weights)")
    from toolchain.io.weights import torch_load_weights_only

    obj = torch_load_weights_only(path, "torch pickle")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not the OSEDiff checkpoint dict")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is not an OSEDiff checkpoint (osediff.pkl): no '{missing[0]}'")
    for k in ("state_dict_unet", "state_dict_vae"):
        if isinstance(obj[k], dict):
            check_finite(obj[k], f"{path} ({k})")
    for k in ("rank_unet", "rank_vae"):
        if not isinstance(obj[k], int) or obj[k] <= 0:
            raise CheckpointError(f"{path}: {k} must be a positive integer, got {obj[k]!r}")
    return obj


def _pairs(state: dict, targets: dict[str, set[str]], rank: int, where: str, part: str) -> tuple[list[LoraPair], dict[str, torch.Tensor]]:
    """LoRA pairs of ``state`` (peft names) checked against the declared targets per adapter; returns
    (pairs, other tensors such as conv_in.base_layer.*)."""
    found: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{where}: {part} entry {key} is not a tensor")
        m = _PEFT_KEY.match(key)
        if m is None:
            rest[key] = t
            continue
        adapter, module = m.group("adapter"), m.group("module")
        if adapter not in targets:
            raise CheckpointError(f"{where}: {part} key {key} uses adapter '{adapter}' (expected {', '.join(sorted(targets))})")
        if module not in targets[adapter]:
            raise CheckpointError(f"{where}: {part} LoRA for {module} is not in the declared {adapter} target list")
        found.setdefault((adapter, module), {})[m.group("ab")] = t
    pairs = []
    for adapter, modules in sorted(targets.items()):
        for module in sorted(modules):
            p = found.get((adapter, module), {})
            if "A" not in p or "B" not in p:
                raise CheckpointError(f"{where}: {part} target {module} ({adapter}) has no lora_{'A' if 'A' not in p else 'B'} tensor")
            if p["A"].shape[0] != rank:
                raise CheckpointError(f"{where}: {part} LoRA for {module} has rank {p['A'].shape[0]}, the file declares {rank}")
            pairs.append(LoraPair(module, p["A"], p["B"], PEFT_DEFAULT_ALPHA))
    return pairs, rest


def _prompt(path: Path, width: int) -> torch.Tensor:
    if not path.is_file():
        raise CheckpointError(f"{path} not found (given to --prompt-embedding)")
    if path.suffix in (".pt", ".pth"):  # torch.save(t, "prompt.pt") is the natural way to write one
        from toolchain.io.weights import torch_load_weights_only

        obj = torch_load_weights_only(path, "torch file")
        tensors = {"prompt_embeds": obj} if isinstance(obj, torch.Tensor) else load_tensors(path)
    else:
        tensors = load_tensors(path)
    check_finite(tensors, str(path))
    if len(tensors) != 1:
        raise CheckpointError(f"{path}: a prompt embedding file holds exactly one tensor, found {len(tensors)}")
    t = next(iter(tensors.values())).float()
    if t.ndim == 2:
        t = t[None]
    if tuple(t.shape) != (1, 77, width):
        raise CheckpointError(f"{path}: prompt embedding has shape {tuple(t.shape)}, the UNet needs (1, 77, {width})")
    return t


def import_osediff(sd: str | os.PathLike, weights: str | os.PathLike, prompt_embedding: str | os.PathLike,
                   out: str | os.PathLike) -> dict[str, Any]:
    """Import the OSEDiff release into a model directory at ``out``; returns the import report (also saved).

    The model maps an LR image (B,3,S,S) in [-1,1], S = UNet sample_size × VAE factor / 4, to (B,3,4S,4S).
    Raises CheckpointError with one sentence naming the offending file.
    """
    sd, weights, prompt_embedding, out = Path(sd), Path(weights), Path(prompt_embedding), Path(out)
    parts = read_sd_folder(sd)
    pkl = read_osediff_pkl(weights)
    unet_targets = {adapter: set(pkl[field]) for adapter, field in _UNET_LISTS.items()}
    unet_pairs, unet_rest = _pairs(pkl["state_dict_unet"], unet_targets, pkl["rank_unet"], str(weights), "state_dict_unet")
    vae_pairs, vae_rest = _pairs(pkl["state_dict_vae"], {"default_encoder": set(pkl["vae_lora_encoder_modules"])},
                                 pkl["rank_vae"], str(weights), "state_dict_vae")
    if set(unet_rest) != {"conv_in.base_layer.weight", "conv_in.base_layer.bias"}:
        extra = sorted(set(unet_rest) ^ {"conv_in.base_layer.weight", "conv_in.base_layer.bias"})
        raise CheckpointError(f"{weights}: state_dict_unet must hold conv_in.base_layer.weight/bias besides LoRA tensors "
                              f"(differs at {extra[0]})")
    if vae_rest:
        raise CheckpointError(f"{weights}: state_dict_vae holds a non-LoRA tensor {sorted(vae_rest)[0]}")
    unet_state, vae_state = dict(parts.unet_state), dict(parts.vae_state)
    for name in ("weight", "bias"):
        new = unet_rest[f"conv_in.base_layer.{name}"]
        if tuple(new.shape) != tuple(unet_state[f"conv_in.{name}"].shape):
            raise CheckpointError(f"{weights}: conv_in.base_layer.{name} has shape {tuple(new.shape)}, the UNet's is "
                                  f"{tuple(unet_state[f'conv_in.{name}'].shape)}")
        unet_state[f"conv_in.{name}"] = new.to(unet_state[f"conv_in.{name}"].dtype)
    unet_merge = merge_lora(unet_state, unet_pairs, str(weights))
    vae_merge = merge_lora(vae_state, vae_pairs, str(weights))

    unet_cfg, vae_cfg = known_unet_keys(parts.unet_config), known_vae_keys(parts.vae_config)
    prompt = _prompt(prompt_embedding, int(unet_cfg["cross_attention_dim"]))
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    hr = int(unet_cfg["sample_size"]) * vae_factor
    if hr % UPSCALE:
        raise CheckpointError(f"{sd / 'unet' / 'config.json'}: sample_size × VAE factor = {hr} is not divisible by {UPSCALE}")
    alpha_bar = float(parts.alphas_cumprod[TIMESTEP])
    config = ModelConfig(name="osediff", image_size=hr // UPSCALE, unet=unet_cfg, vae=vae_cfg, embedder=None, timestep=TIMESTEP,
                         alpha_bar=alpha_bar, latent_scaling=float(vae_cfg.get("scaling_factor", 0.18215)), kind="osediff",
                         upscale=UPSCALE)
    state = {f"unet.{k}": v for k, v in unet_state.items()}
    state.update({f"vae.{k}": v for k, v in vae_state.items()})
    state["prompt_embeds"] = prompt
    with torch.device("meta"):
        expected = OSEDiffModel(config).state_dict()
    if set(expected) != set(state):
        raise CheckpointError(f"{sd}: the imported tensors do not match the architecture its config.json files describe")

    def merged(m):
        return {"targets": m.targets, "conv_targets": m.conv_targets, "rank": m.ranks, "alpha": m.alphas, "scale": m.scales}

    report = {
        "kind": "osediff",
        "sources": {"sd": [file_record(p) for p in parts.files], "weights": file_record(weights),
                    "prompt_embedding": file_record(prompt_embedding)},
        "unet_lora": merged(unet_merge) | {"conv_in": "replaced by conv_in.base_layer, then its LoRA merged"},
        "vae_lora": merged(vae_merge),
        "one_step": {"timestep": TIMESTEP, "alpha_bar": alpha_bar, "upscale": UPSCALE, "input_size": config.image_size,
                     "latent_scaling": config.latent_scaling},
    }
    save_model_dir(out, config, state, {REPORT_NAME: report})
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Human-readable lines for the CLI."""
    u, v, o = report["unet_lora"], report["vae_lora"], report["one_step"]
    return [f"UNet LoRA: {u['targets']} targets ({u['conv_targets']} conv), rank {u['rank']}, scale {u['scale']}; conv_in replaced",
            f"VAE encoder LoRA: {v['targets']} targets, rank {v['rank']}, scale {v['scale']}",
            f"one step: t={o['timestep']}, alpha_bar={o['alpha_bar']:.8f}, x{o['upscale']} from {o['input_size']} px"]
