"""Calibration data: the two-stage face degradation pipeline and HQ/LQ calibration sets."""

from pathlib import Path

BUNDLED_FACES = Path(__file__).resolve().parent / "faces"
