"""The ``toolchain`` command: one verb per pipeline stage.

    calibrate → quantize → (allocate) → export → profile,   plus restore / eval / model / methods

Errors the user can fix are printed as one ``error:`` line with exit status 2; an interrupted
run exits with 130 and can be resumed by running the same command again.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from toolchain import __version__

VERBS = ["calibrate", "quantize", "allocate", "export", "profile", "restore", "evaluate", "compare", "model", "methods", "train_reference"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toolchain",
        description="QuantFace Toolchain: low-bit post-training quantization of one-step diffusion face restoration, "
                    "with ONNX and TFLite export and on-device profiling.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        importlib.import_module(f"toolchain.commands.{verb}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from toolchain.errors import ToolchainError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ToolchainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was left half-written; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
