"""The quantized checkpoint artifact.

    <dir>/
      model.safetensors   every tensor: float weights (already balanced/folded where the method
                          did so), quantizer scales and zero points, online transforms, branches
      quant_config.json   {"format", "version", "model_config", "quant_config",
                           "layers": {path: bits, specs, act scale/zero point, transform, lowrank},
                           "summary"}

The loader rebuilds the float model from ``model_config`` and takes *which* layers are quantized and
at *what* bits from the stored recipe (``quant_config``: the QuantConfig the run executed, completed
by ``quantize_`` with the rules for what the method decided from data); the ``layers`` table must agree
with it layer for layer (a disagreement means an edited or damaged checkpoint and is refused), and
supplies what calibration produced: each grid's observer settings, the online transform and the
low-rank branch. The tensors then load strictly, so a loaded checkpoint reproduces the saved model's
outputs bit for bit. Version 1 checkpoints (written before the recipe was complete) rebuild from the
table alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from toolchain.errors import CheckpointError, ConfigError
from toolchain.io.atomic import atomic_directory, atomic_write_json
from toolchain.io.weights import check_finite, load_tensors, save_tensors
from toolchain.models.configs import ModelConfig
from toolchain.models.osdface import OSDFaceModel, build_model
from toolchain.quant.calibrate import quant_layers, set_submodule
from toolchain.quant.components import build_component
from toolchain.quant.config import QuantConfig, quantizable_layers
from toolchain.quant.executed import record_method_decisions
from toolchain.quant.layers import QUANT_LAYER_TYPES
from toolchain.quant.quantizer import QuantSpec
from toolchain.topology import topology_of

FORMAT = "quantface-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def layer_table(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    return {name: layer.describe() for name, layer in quant_layers(model)}


def save_quantized(model: OSDFaceModel, qconfig: QuantConfig, out_dir: str | os.PathLike, summary: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint directory atomically. ``qconfig`` is first completed in place with exact-name
    rules for any layer whose bits it does not already give (``record_method_decisions``), so the stored
    recipe is the executed one and the loader can rebuild from it."""
    out_dir = Path(out_dir)
    record_method_decisions(model, qconfig)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "quant_config": qconfig.to_dict(),
        "layers": layer_table(model),
        "summary": summary or {},
    }
    with atomic_directory(out_dir) as tmp:
        save_tensors(tmp / "model.safetensors", model.state_dict(), metadata={"format": FORMAT})
        atomic_write_json(tmp / "quant_config.json", meta)
    return out_dir


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder whose quant_config.json says it is a quantized checkpoint."""
    try:
        meta = json.loads((Path(path) / "quant_config.json").read_text())
        return isinstance(meta, dict) and meta.get("format") == FORMAT
    except (OSError, ValueError):
        return False


def read_checkpoint_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    ckpt_dir = Path(ckpt_dir)
    cfg_path = ckpt_dir / "quant_config.json"
    if not ckpt_dir.is_dir() or not cfg_path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a quantized checkpoint (no quant_config.json); create one with `toolchain quantize`")
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object, not {type(meta).__name__ if meta is not None else 'null'}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path} is not a {FORMAT} file")
    if meta.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{cfg_path} has checkpoint version {meta.get('version')}; this toolchain reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    for key, what in (("model_config", "a JSON object"), ("layers", "a JSON object (layer path → entry)"), ("quant_config", "a JSON object")):
        if key not in meta:
            raise CheckpointError(f"{cfg_path} lacks '{key}'; the checkpoint is incomplete — quantize again")
        if not isinstance(meta[key], dict):
            raise CheckpointError(f"{cfg_path}: '{key}' must be {what}, not {_json_type(meta[key])}")
    for name, desc in meta["layers"].items():
        if not isinstance(desc, dict):
            raise CheckpointError(f"{cfg_path}: layer '{name}' must be a JSON object, not {_json_type(desc)}")
    return meta


def check_quant_params(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse non-finite tensors and quantizer scales that are zero or negative (they would be clamped
    to a tiny epsilon at run time and silently change every output). Raises CheckpointError naming the tensor."""
    check_finite(state, where)
    for name, t in state.items():
        if ".scale" in name and "quantizer" in name and name.endswith("scale") and t.is_floating_point() and t.numel():
            bad = t <= 0
            if bool(bad.any()):
                raise CheckpointError(f"{where}: quantizer scale {name} has {int(bad.sum())} zero or negative value(s) "
                                      f"(min {float(t.min()):.3g}); scales must be positive — the checkpoint is damaged")


def rebuild_quant_structure(model: torch.nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Re-create quantized layers (empty quantizers, transforms, branches) from a layer table."""
    for name, desc in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"checkpoint layer '{name}' does not exist in the model") from None
        qcls = QUANT_LAYER_TYPES.get(type(module))
        if qcls is None or qcls.KIND != desc.get("kind"):
            raise CheckpointError(f"checkpoint layer '{name}' is a {desc.get('kind')}, the model has {type(module).__name__}")
        w_spec = QuantSpec.from_dict(desc["weight"]) if desc.get("weight") else None
        a_spec = QuantSpec.from_dict(desc["activation"]) if desc.get("activation") else None
        q = qcls.from_float(module, w_spec, a_spec)
        if desc.get("transform"):
            q.input_transform = build_component(desc["transform"], q)
        if desc.get("lowrank"):
            q.lowrank = build_component(desc["lowrank"], q)
        set_submodule(model, name, q)


def _layer_bits(name: str, desc: dict[str, Any], where: str) -> tuple[int | None, int | None]:
    """A table entry's (weight, activation) bits, checked to be integers and to agree with its specs' bits."""
    bits = []
    for short, spec_key in (("w_bits", "weight"), ("a_bits", "activation")):
        value, spec = desc.get(short), desc.get(spec_key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointError(f"{where}: layer '{name}': '{short}' must be an integer, not {json.dumps(value)}")
        spec_bits = spec.get("bits") if isinstance(spec, dict) else None
        if spec is not None and not isinstance(spec, dict):
            raise CheckpointError(f"{where}: layer '{name}': '{spec_key}' must be a JSON object or null, not {_json_type(spec)}")
        if spec_bits != value:
            raise CheckpointError(f"{where}: layer '{name}' has {short} {json.dumps(value)} but its {spec_key} spec says "
                                  f"{json.dumps(spec_bits)} bits — the checkpoint was edited or damaged; quantize again")
        bits.append(value)
    return bits[0], bits[1]


def check_table_against_recipe(model: torch.nn.Module, qconfig: QuantConfig, layers: dict[str, dict[str, Any]], where: str) -> None:
    """Refuse a layer table that is not what ``qconfig`` selects on ``model`` (the float model): the
    same set of layers, each with the recipe's weight and activation bits (in its ``w_bits``/``a_bits``
    and in its specs), and a registered method. Raises CheckpointError naming the first disagreements."""
    from toolchain.quant.registry import registered_methods

    if qconfig.method not in registered_methods():
        raise CheckpointError(f"{where}: the stored recipe names method '{qconfig.method}', which is not registered "
                              f"(known: {', '.join(sorted(registered_methods()))})")
    plan = {name: qconfig.layer_specs(name) for name, _ in quantizable_layers(model)}
    plan = {name: (s[0].bits, s[1].bits) for name, s in plan.items() if s is not None}
    have = {name: _layer_bits(name, desc, where) for name, desc in layers.items()}
    problems = [f"'{n}' is quantized but the recipe keeps it float" for n in layers if n not in plan]
    problems += [f"'{n}' is missing (the recipe quantizes it at W{w}A{a})" for n, (w, a) in plan.items() if n not in layers]
    for name, bits in have.items():
        if name in plan and bits != plan[name]:
            problems.append(f"'{name}' is W{bits[0]}A{bits[1]}, the recipe says W{plan[name][0]}A{plan[name][1]}")
    if problems:
        raise CheckpointError(f"{where}: the layer table disagrees with the stored recipe ({len(problems)} layer(s)): "
                              f"{'; '.join(problems[:3])}{' …' if len(problems) > 3 else ''} — the checkpoint was edited or "
                              f"damaged; quantize again")


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def load_quantized(ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[OSDFaceModel, dict[str, Any]]:
    """Load a checkpoint directory; returns (model in eval mode, metadata)."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_checkpoint_meta(ckpt_dir)
    model = build_model(ModelConfig.from_dict(meta["model_config"]), seed=None)
    if meta["version"] >= 2:
        try:
            qconfig = QuantConfig.from_dict(meta["quant_config"])
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{ckpt_dir}/quant_config.json: the stored recipe is invalid ({exc})") from None
        check_table_against_recipe(model, qconfig, meta["layers"], f"{ckpt_dir}/quant_config.json")
    else:  # version 1: no complete recipe to check against; each entry must at least agree with itself
        for name, desc in meta["layers"].items():
            _layer_bits(name, desc, f"{ckpt_dir}/quant_config.json")
    try:
        rebuild_quant_structure(model, meta["layers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt_dir}/quant_config.json has a malformed layer entry ({type(exc).__name__}: {exc})") from None
    state = load_tensors(ckpt_dir / "model.safetensors")
    check_quant_params(state, f"{ckpt_dir}/model.safetensors")
    fold = getattr(model, "fold_constant_prompt", None)
    topo = topology_of(model)
    if fold is not None and any(k.endswith(".value") and topo.is_constant_prompt_module(k[: -len(".value")]) for k in state):
        fold()  # saved after quantize_ folded the constant-prompt k/v: same structure; the saved constants load below
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise CheckpointError(f"{ckpt_dir}/model.safetensors does not match quant_config.json: {' '.join(first[:2])[:300]}") from None
    return model.to(device).eval(), meta
