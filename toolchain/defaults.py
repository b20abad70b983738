"""Where bundled defaults live inside the package."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = PACKAGE_DIR / "weights" / "ref.safetensors"


def resolve_model_path(path: Path | None) -> Path:
    """``path``, or the bundled default model when None. Raises CheckpointError if the bundled file is missing."""
    if path is not None:
        return path
    if not DEFAULT_MODEL.is_file():
        from toolchain.errors import CheckpointError

        raise CheckpointError(f"the bundled default model {DEFAULT_MODEL} is missing; pass --model PATH")
    return DEFAULT_MODEL


def device_from_arg(name: str | None) -> "torch.device":  # noqa: F821
    """'auto' picks CUDA when present; explicit names are validated against this machine.

    Raises ConfigError (one line) for unknown names and for devices this machine lacks."""
    import torch

    from toolchain.errors import ConfigError

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} requested but no CUDA GPU is available (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"--device {name} requested but Apple's MPS backend is not available here (use --device cpu or auto)")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {name} is not supported (cpu, cuda, cuda:N, mps or auto)")
    return dev
