"""Where bundled defaults live inside the package."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = PACKAGE_DIR / "weights" / "ref.safetensors"


def device_from_arg(name: str | None) -> "torch.device":  # noqa: F821
    """'auto' picks CUDA when present; explicit names are validated."""
    import torch

    from toolchain.errors import ConfigError

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA GPU is available")
    return dev
