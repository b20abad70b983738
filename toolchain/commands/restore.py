"""`toolchain restore`: one-step restoration of face images of any size and format."""

from __future__ import annotations

import argparse
from pathlib import Path

from toolchain.commands.common import add_model_args, add_overwrite_arg, add_runtime_args, load_any_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("restore", help="restore face images, or upscale x4 with an OSEDiff (SR) model; float model or quantized checkpoint",
                       description="Restore images (any format Pillow opens: PNG/JPEG/GIF/TIFF/WebP/TGA/PPM/..., 8/16-bit or "
                                   "float, RGB, RGBA, palette, CMYK or grey, any size). Each image is resized and padded to the model's "
                                   "input size, run through the model and written as PNG in its original mode: at its original size "
                                   "for a face-restoration model (OSDFace), at its upscale factor times the original size for a "
                                   "super-resolution model (OSEDiff: 4x; `toolchain model info` shows the factor). Folders are "
                                   "scanned by content: files that cannot be used (not still images, animated, truncated, too small, "
                                   "...) are skipped and listed by name at the end; a file named on the command line must be usable.")
    p.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder (PNG files named after the inputs); never an input folder; existing files of the same name "
                        "are replaced only if an earlier restore wrote them (else --overwrite)")
    add_overwrite_arg(p, "replace existing files of the same name in --out")
    p.add_argument("--upstream-preprocessing", action="store_true",
                   help="reproduce the release's own pre/post-processing for parity checks (OSDFace: square -> model size "
                        "bilinear, align_corners=True, output stays at that size; non-square at native size, output cropped "
                        "to a multiple of 8. OSEDiff: Pillow bicubic x4 at native size, latent tiling only above the trained "
                        "size). Output is RGB without alpha, rounded to 8 bits")
    p.add_argument("--color-fix", choices=("none", "adain"), default="none",
                   help="OSEDiff only: adain matches each output channel's mean/std to the upscaled input (upstream's "
                        "default; default here: none)")
    add_model_args(p)
    add_runtime_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from toolchain.defaults import device_from_arg
    from toolchain.io.images import scan_images
    from toolchain.io.outputs import check_output_files_into, output_lock
    from toolchain.io.images import written_by
    from toolchain.pipeline.restore import RESTORE_SOFTWARE, output_names, restore_files

    scan = scan_images(args.inputs)
    check_output_files_into(args.out, output_names(scan.paths), inputs=args.inputs, overwrite=args.overwrite,
                            is_artifact=lambda p: written_by(p) == RESTORE_SOFTWARE)
    device = device_from_arg(args.device)
    with output_lock(args.out):
        model = load_any_model(args, device)
        written = restore_files(model, scan.paths, args.out, model.image_size, args.batch_size, device,
                                upstream=args.upstream_preprocessing, color_fix=args.color_fix)
    line = f"restored {len(written)}"
    if scan.skipped:
        line += f", {scan.skipped_text()}"
    print(f"{line} -> {args.out}")
    return 0
