"""Allocation plots: per-layer sensitivity (the paper's Fig. 5) and chosen bits along the network."""

from __future__ import annotations

import io
from pathlib import Path

from toolchain.io.atomic import atomic_write_bytes


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _short(name: str) -> str:
    return name.replace("transformer_blocks.", "tb").replace("attentions.", "at").replace("resnets.", "rn").replace("down_blocks.", "d").replace("up_blocks.", "u")


def _part_colors(names: list[str]) -> list[str]:
    return ["tab:orange" if n.startswith("vae.encoder") else "tab:blue" if n.startswith("unet") else "tab:green" for n in names]


def plot_sensitivity(layers: list[dict], path: Path, epsilon: float, metric: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [l["name"] for l in layers]
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.06), 3.5))
    ax.bar(range(len(names)), [l["sensitivity_bits"] for l in layers], color=_part_colors(names), width=1.0)
    ax.set_ylabel(f"bits B_i to reach ε={epsilon} ({metric})")
    ax.set_xlabel("activation layer, in execution order (orange: VAE encoder, blue: UNet, green: VAE decoder)")
    ax.set_title("per-layer activation sensitivity")
    ax.set_xlim(-0.5, len(names) - 0.5)
    return _save(fig, path)


def plot_bits(layers: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [l["name"] for l in layers]
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.06), 3.5))
    ax.bar(range(len(names)), [l["a_bits"] for l in layers], color=_part_colors(names), width=1.0)
    ax.set_ylabel("activation bits")
    ax.set_xlabel("activation layer, in execution order")
    ax.set_title(title)
    ax.set_xlim(-0.5, len(names) - 0.5)
    return _save(fig, path)
