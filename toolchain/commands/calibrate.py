"""`toolchain calibrate`: build an HQ/LQ calibration set with the two-stage degradation."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="build an HQ/LQ calibration set from HQ face images",
                       description="Degrade HQ faces (blur → downsample → noise → JPEG, twice; seeded) into an HQ/LQ "
                                   "calibration set with a manifest. Interrupted builds resume when rerun with the same arguments.")
    p.add_argument("--hq", nargs="+", type=Path, default=None, help="HQ face images or folders (default: the bundled public-domain faces)")
    p.add_argument("-n", "--count", type=int, default=16, help="number of pairs (sources are cycled with flips; default 16)")
    p.add_argument("--size", type=int, default=128, help="square side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="degradation seed (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calibration import BUNDLED_FACES
    from calibration.dataset import build_calibration_set

    out = build_calibration_set(args.hq or [BUNDLED_FACES], args.out, args.count, args.size, args.seed)
    print(f"calibration set: {out} ({args.count} pairs at {args.size}x{args.size}, seed {args.seed})")
    return 0
