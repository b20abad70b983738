"""`toolchain quantize`: float model + calibration set → quantized checkpoint."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from toolchain.commands.common import positive_int
from toolchain.commands.common import add_model_args, add_nproc_arg, add_overwrite_arg, add_runtime_args, maybe_relaunch, resolve_model_path
from toolchain.errors import ConfigError
from toolchain.io.hashing import sha256_file, sha256_tree


# The built-in methods' names, kept here so that --help imports no torch; tests/test_cli.py checks that they are
# the registered ones (toolchain.quant.registry.registered_methods).
METHOD_NAMES = ("efficientdm", "minmax", "passionsr", "qartsr", "qdiffusion", "quantface", "smoothquant", "svdquant")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model with a registered method",
                       description="Quantize a float model with a registered method and write a checkpoint directory "
                                   "(model.safetensors + quant_config.json). `toolchain methods` lists methods and their parameters.")
    add_model_args(p, checkpoint=False)
    p.add_argument("--method", default="minmax", help=f"quantization method: {', '.join(METHOD_NAMES)} (default minmax; "
                                                        "`toolchain methods` lists each with its parameters, installed plugins included)")
    p.add_argument("--bits", default="w8a8", help="default weight/activation bits, e.g. w4a4, w6a6 (default w8a8)")
    p.add_argument("--config", type=Path, default=None, help="full QuantConfig JSON (overrides --method/--bits)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter, converted to its type (integer, number, true/false, text, none for optional ones, comma-separated or JSON list); `toolchain methods` lists them; repeatable")
    p.add_argument("--include", action="append", default=None, metavar="REGEX", help="layers in scope (default: ^unet\\. and ^vae\\.)")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX", help="layers kept in float")
    p.add_argument("--rule", action="append", default=[], metavar="REGEX=wXaY", help="per-layer bits override, e.g. 'conv_in$=w8a8'")
    p.add_argument("--mp-table", type=Path, default=None, help="mixed-precision table (mp_table.json) whose per-layer bits to apply")
    p.add_argument("--calib", type=Path, required=True, help="calibration set folder (from `toolchain calibrate`)")
    p.add_argument("--calib-limit", type=positive_int, default=None, help="use only the first N calibration images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True,
                   help="checkpoint directory to write: new, empty or a previous checkpoint (else --overwrite); an interrupted "
                        "run resumes only when model, calibration set and settings are unchanged")
    add_overwrite_arg(p)
    add_runtime_args(p, distributed=True)
    add_nproc_arg(p)
    p.set_defaults(func=run)


def _parse_params(items: list[str], method: str | None = None) -> dict:
    """``--param KEY=VALUE`` items as {KEY: value}; a value is read as JSON, else kept as text. With
    ``method``, each value is checked against (and converted to) the type of the method's parameter:
    ``--param train_steps=abc`` is ``error: --param train_steps=abc: expected an integer``."""
    params, raw, labels = {}, {}, {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param expects KEY=VALUE, got '{item}'")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
        raw[key], labels[key] = value, f"--param {item}"
    if method is not None:
        from toolchain.quant.registry import coerce_params, method_class

        params = coerce_params(method_class(method), params, labels, raw)
    return params


def build_config(args: argparse.Namespace):
    from toolchain.quant.config import LayerRule, QuantConfig, parse_bits

    if args.config is not None:
        cfg = QuantConfig.load(args.config)
    else:
        cfg = QuantConfig.for_bits(args.method, args.bits)
    if args.include:
        cfg.include = list(args.include)
    cfg.exclude += list(args.exclude)
    for item in args.rule:
        pattern, sep, bits = item.rpartition("=")
        if not sep:
            raise ConfigError(f"--rule expects REGEX=wXaY, got '{item}'")
        w, a = parse_bits(bits)
        cfg.rules.append(LayerRule(pattern, w, a))
    cfg.rule_sources = {}
    if args.mp_table is not None:
        from toolchain.alloc.table import load_table, table_rules

        rules = table_rules(load_table(args.mp_table))
        cfg.rules += rules
        cfg.rule_sources = {r.pattern: str(args.mp_table) for r in rules}
    cfg.params.update(_parse_params(args.param, cfg.method))
    return cfg


def run_inputs(args: argparse.Namespace, cfg, model_path: Path) -> dict:
    """What an interrupted run's training state depends on: recorded in the work folder and compared on resume."""
    import torch

    from toolchain import __version__

    return json.loads(json.dumps({
        "quant_config": cfg.to_dict(), "model_sha256": sha256_tree(model_path), "preset": args.preset,
        "calibration_manifest_sha256": sha256_tree(args.calib / "manifest.json"), "calib_limit": args.calib_limit,
        "batch_size": args.batch_size, "seed": args.seed, "toolchain": __version__, "torch": torch.__version__,
    }, default=str))


def run(args: argparse.Namespace) -> int:
    import contextlib

    from toolchain import distributed as D
    from toolchain.defaults import device_from_arg
    from toolchain.io.outputs import check_output_dir, output_lock
    from toolchain.quant.checkpoint import is_checkpoint

    model_path = resolve_model_path(args.model)
    check_output_dir(args.out, "quantized checkpoint", is_checkpoint, inputs=[model_path, args.calib, args.config, args.mp_table],
                     overwrite=args.overwrite)
    if getattr(args, "nproc_per_node", None) not in (None, 1) and not D.launched():
        get_method_checked(args)  # bad method parameters: one error line here, before any rank starts
        from toolchain.calibration.dataset import CalibrationSet
        from toolchain.models.storage import model_config

        CalibrationSet.open(args.calib).check_for(int(getattr(model_config(model_path, args.preset), "upscale", 1) or 1))
    status = maybe_relaunch(args)
    if status is not None:
        return status
    with D.session(device_from_arg(args.device)) as device:
        with output_lock(args.out) if D.is_main() else contextlib.nullcontext():  # rank 0 writes; the others wait for it
            D.barrier()
            return _run_locked(args, model_path, device)


def get_method_checked(args: argparse.Namespace) -> None:
    from toolchain.quant.registry import get_method

    cfg = build_config(args)
    get_method(cfg.method, cfg.params)


def _run_locked(args: argparse.Namespace, model_path: Path, device) -> int:
    """The quantization itself; under torchrun every rank runs it (training is data-parallel) and rank 0
    alone writes the work folder's records, the checkpoint and the summary line."""
    import tempfile

    from toolchain import distributed as D

    from toolchain.calibration.dataset import CalibrationSet
    from toolchain.io.resume import prepare_workdir
    from toolchain.quant.registry import MethodContext, get_method
    from toolchain.models.storage import load_model
    from toolchain.quant.api import quantize_
    from toolchain.quant.checkpoint import save_quantized
    from toolchain.quant.config import quantizable_layers

    cfg = build_config(args)
    get_method(cfg.method, cfg.params)  # validate method and params before any heavy work
    model = load_model(model_path, args.preset).to(device)
    cfg.check_matches([n for n, _ in quantizable_layers(model)], cfg.rule_sources)
    data = CalibrationSet.open(args.calib)
    data.check_for(getattr(model.config, "upscale", 1))  # SR models (osediff) calibrate on LR inputs of ×4 pairs
    batches = data.batches(model.image_size, args.batch_size, limit=args.calib_limit)
    workdir = args.out.parent / f".{args.out.name}.work"
    scratch = None
    if D.is_main():
        prepare_workdir(workdir, run_inputs(args, cfg, model_path))
    else:  # other ranks keep their (identical) intermediate state privately; training state comes from rank 0
        scratch = tempfile.TemporaryDirectory(prefix=f"toolchain-rank{D.rank()}-")
    D.barrier()
    ctx = MethodContext(lq_batches=batches, workdir=workdir if scratch is None else Path(scratch.name), device=device, seed=args.seed)
    try:
        summary = quantize_(model, cfg, ctx)
    finally:
        if scratch is not None:
            scratch.cleanup()
    if not D.is_main():
        D.barrier()  # wait until rank 0 has written the checkpoint
        return 0
    if D.world_size() > 1:
        summary["processes"] = D.world_size()
    summary["source_model"] = str(Path(model_path).resolve())
    summary["source_model_sha256"] = sha256_file(model_path) if Path(model_path).is_file() else None
    summary["calibration_set"] = str(args.calib.resolve())
    summary["calibration_images"] = sum(b.shape[0] for b in batches)
    if args.mp_table is not None:
        from toolchain.alloc.table import load_table

        table = load_table(args.mp_table)
        summary["mp_table"] = {"path": str(args.mp_table.resolve()), "average_a_bits": table["average_a_bits"],
                               "cost_model": table["cost_model"], "budget": table["budget"]}
    try:
        save_quantized(model.cpu(), cfg, args.out, summary)
        shutil.rmtree(workdir, ignore_errors=True)
    finally:
        D.barrier()
    print(f"{cfg.method} {cfg.bits_label}: {summary.get('quantized_layers', '?')} layers quantized in {summary['seconds']} s -> {args.out}")
    return 0
