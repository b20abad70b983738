"""`toolchain restore`: one-step restoration of face images of any size and format."""

from __future__ import annotations

import argparse
from pathlib import Path

from toolchain.commands.common import add_model_args, add_runtime_args, load_any_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("restore", help="restore face images with a float model or a quantized checkpoint",
                       description="Restore face images (PNG/JPEG/..., RGB, RGBA or grey, any size). Each image is resized and "
                                   "padded to the model size, restored, and written back at its original size and mode.")
    p.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--out", type=Path, required=True, help="output folder (PNG files named after the inputs)")
    add_model_args(p)
    add_runtime_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from toolchain.defaults import device_from_arg
    from toolchain.pipeline.restore import restore_files

    device = device_from_arg(args.device)
    model = load_any_model(args, device)
    written = restore_files(model, args.inputs, args.out, model.image_size, args.batch_size, device)
    print(f"restored {len(written)} image(s) -> {args.out}")
    return 0
