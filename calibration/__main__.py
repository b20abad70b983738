"""``python -m calibration`` is ``toolchain calibrate``."""

from toolchain.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["calibrate"] + __import__("sys").argv[1:]))
