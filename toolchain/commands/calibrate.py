"""`toolchain calibrate`: build an HQ/LQ calibration set with the two-stage degradation."""

from __future__ import annotations

import argparse
from pathlib import Path

from toolchain.commands.common import add_overwrite_arg, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="build an HQ/LQ calibration set from HQ images: same-size pairs (face restoration) or x4 SR pairs (OSEDiff)",
                       description="Degrade HQ faces (blur → downsample → noise → JPEG, twice; seeded) into an HQ/LQ "
                                   "calibration set with a manifest. Interrupted builds resume when rerun with the same arguments.")
    p.add_argument("--hq", nargs="+", type=Path, default=None,
                   help="HQ face images or folders (default: the bundled public-domain faces); folders are scanned by content, "
                        "files that cannot be used (not still images, too small, ...) are skipped and listed")
    p.add_argument("-n", "--count", type=positive_int, default=16, help="number of pairs (sources are cycled with flips; default 16)")
    p.add_argument("--size", type=positive_int, default=128, help="square side in pixels, 16 to 2048 (default 128)")
    p.add_argument("--seed", type=int, default=0, help="degradation seed (default 0)")
    p.add_argument("--task", choices=("restore", "sr"), default=None,
                   help="restore: LQ at the HQ size (OSDFace); sr: LQ = degraded HQ downscaled by --scale (default 4), "
                        "for OSEDiff. Default: from --model's kind, else restore")
    p.add_argument("--scale", type=positive_int, default=None, help="SR scale (HQ/LQ side ratio) for --task sr (default 4)")
    p.add_argument("--model", type=Path, default=None,
                   help="the model the set is for: an SR model (osediff) makes x<upscale> LR/HR pairs")
    p.add_argument("--preset", default=None, help="architecture preset for a --model file that carries no config")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: new, empty or a previous calibration set (never an --hq folder; else --overwrite)")
    add_overwrite_arg(p)
    p.set_defaults(func=run)


def sr_scale(args: argparse.Namespace) -> int:
    """The HQ/LQ scale the options ask for: --scale, else 4 for --task sr, else --model's upscale, else 1.
    Raises InputError for contradictory options."""
    from toolchain.errors import InputError

    model_scale = None
    if args.model is not None:
        from toolchain.models.storage import model_config

        model_scale = model_config(args.model, args.preset).upscale
    if args.task == "restore" and (args.scale or 1) > 1:
        raise InputError("--scale applies to --task sr (a restore set has LQ and HQ at the same size)")
    scale = args.scale or (4 if args.task == "sr" else model_scale if args.task is None and model_scale else 1)
    if args.task == "sr" and scale < 2:
        raise InputError("--task sr needs --scale of at least 2")
    if model_scale is not None and model_scale != scale:
        raise InputError(f"--model {args.model} upscales x{model_scale}, but the options ask for x{scale} pairs")
    return scale


def run(args: argparse.Namespace) -> int:
    from toolchain.calibration import BUNDLED_FACES
    from toolchain.calibration.dataset import build_calibration_set

    from toolchain.io.images import scan_images

    scale = sr_scale(args)
    hq = args.hq or [BUNDLED_FACES]
    scan = scan_images(hq, what="--hq")
    out = build_calibration_set(hq, args.out, args.count, args.size, args.seed, overwrite=args.overwrite, scale=scale)
    skipped = f"; {scan.skipped_text()}" if scan.skipped else ""
    pairs = f"x{scale} SR pairs (LQ {args.size // scale}x{args.size // scale})" if scale > 1 else "pairs"
    print(f"calibration set: {out} ({args.count} {pairs} at {args.size}x{args.size} from {len(scan.paths)} source image(s), "
          f"seed {args.seed}{skipped})")
    return 0
