"""QuantFace Toolchain: quantize one-step diffusion face restoration and ship it to phones."""

import logging as _logging
import os as _os

__version__ = "0.1.0"


def _quiet_third_party() -> None:
    """Silence import-time chatter of optional backends (torchao enum registration, TF/absl banners)."""
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub at run time
    _os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    _os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torch.utils._pytree", "torchao", "diffusers", "jax._src.xla_bridge"):
        _logging.getLogger(name).setLevel(_logging.ERROR)


_quiet_third_party()
