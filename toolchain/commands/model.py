"""`toolchain model`: create, inspect and convert float models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="create, inspect or convert float models",
                       description="Create a randomly initialised model from a preset, print a model's architecture summary, "
                                   "or convert between the single-file, directory and diffusers-folder formats.")
    msub = p.add_subparsers(dest="model_cmd", required=True)
    init = msub.add_parser("init", help="write a randomly initialised model of a preset (for tests and timing)")
    init.add_argument("--preset", required=True, help="tiny, ref or osdface")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--format", choices=["file", "dir", "diffusers"], default="file")
    init.add_argument("--out", type=Path, required=True, help="new path, or an earlier model of the toolchain (else --overwrite)")
    init.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a toolchain model")
    info = msub.add_parser("info", help="print a model's config and parameter counts")
    info.add_argument("path", type=Path)
    info.add_argument("--preset", default=None)
    conv = msub.add_parser("convert", help="convert a model to another on-disk format")
    conv.add_argument("src", type=Path)
    conv.add_argument("dst", type=Path, help="new path, or an earlier model of the toolchain (else --overwrite); never SRC")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing DST that is not a toolchain model")
    conv.add_argument("--preset", default=None)
    conv.add_argument("--format", choices=["file", "dir", "diffusers"], default="diffusers")
    conv.add_argument("--fp16", action="store_true", help="store weights as float16")
    p.set_defaults(func=run)


def is_model_artifact(path: Path) -> bool:
    """True for a model the toolchain wrote: a model/diffusers folder, or a .safetensors file carrying its config."""
    if path.is_dir():
        return (path / "model_config.json").is_file() or (path / "toolchain_model.json").is_file()
    try:
        from toolchain.io.weights import read_safetensors_metadata
        from toolchain.models.storage import CONFIG_KEY

        return path.suffix == ".safetensors" and CONFIG_KEY in read_safetensors_metadata(path)
    except Exception:  # unreadable: not ours
        return False


def check_destination(dst: Path, fmt: str, inputs: list, overwrite: bool) -> None:
    """Refuse a destination that is the source or a foreign file/folder (before any work)."""
    from toolchain.io.outputs import check_output_dir, check_output_file

    if fmt == "file":
        check_output_file(dst, "model file", is_model_artifact, inputs=inputs, overwrite=overwrite)
    else:
        check_output_dir(dst, "model folder", is_model_artifact, inputs=inputs, overwrite=overwrite)


def run(args: argparse.Namespace) -> int:
    import torch

    from toolchain.models import build_model, load_model, preset, save_model

    if args.model_cmd == "init":
        check_destination(args.out, args.format, [], args.overwrite)
        model = build_model(preset(args.preset), seed=args.seed)
        save_model(model, args.out, args.format)
        print(f"random {args.preset} model (seed {args.seed}) -> {args.out}")
    elif args.model_cmd == "info":
        model = load_model(args.path, args.preset)
        parts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("unet", "vae", "embedder")}
        print(json.dumps({"name": model.config.name, "image_size": model.image_size, "timestep": model.config.timestep,
                          "params_M": {k: round(v / 1e6, 3) for k, v in parts.items()}}, indent=2))
    else:
        check_destination(args.dst, args.format, [args.src], args.overwrite)
        model = load_model(args.src, args.preset)
        save_model(model, args.dst, args.format, dtype=torch.float16 if args.fp16 else None)
        print(f"{args.src} -> {args.dst} ({args.format})")
    return 0
