"""`toolchain calibrate`: build an HQ/LQ calibration set with the two-stage degradation."""

from __future__ import annotations

import argparse
from pathlib import Path

from toolchain.commands.common import add_overwrite_arg, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="build an HQ/LQ calibration set from HQ face images",
                       description="Degrade HQ faces (blur → downsample → noise → JPEG, twice; seeded) into an HQ/LQ "
                                   "calibration set with a manifest. Interrupted builds resume when rerun with the same arguments.")
    p.add_argument("--hq", nargs="+", type=Path, default=None,
                   help="HQ face images or folders (default: the bundled public-domain faces); folders are scanned by content, "
                        "files that are not still images are skipped and listed")
    p.add_argument("-n", "--count", type=positive_int, default=16, help="number of pairs (sources are cycled with flips; default 16)")
    p.add_argument("--size", type=positive_int, default=128, help="square side in pixels, 16 to 2048 (default 128)")
    p.add_argument("--seed", type=int, default=0, help="degradation seed (default 0)")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: new, empty or a previous calibration set (never an --hq folder; else --overwrite)")
    add_overwrite_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calibration import BUNDLED_FACES
    from calibration.dataset import build_calibration_set

    from toolchain.io.images import scan_images

    hq = args.hq or [BUNDLED_FACES]
    scan = scan_images(hq, what="--hq")
    out = build_calibration_set(hq, args.out, args.count, args.size, args.seed, overwrite=args.overwrite)
    skipped = f"; {scan.skipped_text()}" if scan.skipped else ""
    print(f"calibration set: {out} ({args.count} pairs at {args.size}x{args.size} from {len(scan.paths)} source image(s), "
          f"seed {args.seed}{skipped})")
    return 0
