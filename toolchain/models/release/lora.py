"""LoRA files in the diffusers/peft "unet.<module>.lora_A.weight" layout, and merging them into weights.

Upstream OSDFace ``infer.py`` (``merge_Unet``) and ``pytorch_lora_weights.safetensors`` (UPSTREAM.md
"Release layouts"): for a target ``<module>`` with weight W,

* linear: A (r, in), B (out, r),                 ΔW = B·A
* conv:   A (r, C_in, kh, kw), B (C_out, r, 1, 1), ΔW = (B.view(C_out, r) · A.view(r, −1)).view(W.shape)

and W ← W + scale·ΔW with scale = α / r. The release has r = 16 and no alpha keys; its loader passes
α = 16, so scale = 1.0 (diffusers' ``load_lora_weights`` also uses 1.0 without alpha keys). Here α
comes from an ``<module>.alpha`` key when the file has one, else from the caller, else α = r.
The target list is not published: it is read from the keys, and every target must exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from toolchain.errors import CheckpointError

_KEY = re.compile(r"^(?P<prefix>[A-Za-z_]+)\.(?P<module>.+)\.(?:lora_(?P<ab>[AB])\.weight|(?P<alpha>alpha))$")


@dataclass(frozen=True)
class LoraPair:
    module: str            # target module path inside the network (without the file's prefix)
    down: torch.Tensor     # A: (r, in) or (r, C_in, kh, kw)
    up: torch.Tensor       # B: (out, r) or (C_out, r, 1, 1)
    alpha: float | None    # from the file, if it has an alpha key

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def read_lora(state: dict[str, torch.Tensor], prefix: str, where: str) -> list[LoraPair]:
    """Parse a ``<prefix>.<module>.lora_{A,B}.weight`` (+ optional ``.alpha``) state dict into pairs.

    Raises CheckpointError naming ``where`` for keys outside that grammar, another prefix, or a
    target with only one of A/B.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = _KEY.match(key)
        if m is None or m.group("prefix") != prefix:
            raise CheckpointError(f"{where}: {key} is not a '{prefix}.<module>.lora_A/lora_B.weight' key; is it the LoRA file?")
        slot = "alpha" if m.group("alpha") else m.group("ab")
        parts.setdefault(m.group("module"), {})[slot] = t
    if not parts:
        raise CheckpointError(f"{where} holds no LoRA tensors")
    pairs = []
    for module, p in sorted(parts.items()):
        if "A" not in p or "B" not in p:
            raise CheckpointError(f"{where}: LoRA target {module} has lora_{'A' if 'B' in p else 'B'} but not its partner")
        alpha = float(p["alpha"].reshape(()).item()) if "alpha" in p else None
        pairs.append(LoraPair(module, p["A"], p["B"], alpha))
    return pairs


def lora_delta(pair: LoraPair, weight_shape: tuple[int, ...], where: str) -> torch.Tensor:
    """ΔW = B·A in the target weight's shape (float64). Raises CheckpointError on shape mismatch."""
    a, b, r = pair.down, pair.up, pair.rank
    if len(weight_shape) == 2:
        ok = tuple(a.shape) == (r, weight_shape[1]) and tuple(b.shape) == (weight_shape[0], r)
    elif len(weight_shape) == 4:
        ok = tuple(a.shape) == (r, *weight_shape[1:]) and tuple(b.shape) == (weight_shape[0], r, 1, 1)
    else:
        ok = False
    if not ok:
        raise CheckpointError(f"{where}: LoRA for {pair.module} has A {tuple(a.shape)}, B {tuple(b.shape)}, which do not fit "
                              f"its weight {tuple(weight_shape)}")
    delta = b.reshape(weight_shape[0], r).double() @ a.reshape(r, -1).double()
    return delta.reshape(weight_shape)


@dataclass
class MergeReport:
    targets: int
    ranks: list[int]
    alphas: list[float]
    scales: list[float]
    conv_targets: int


def merge_lora(weights: dict[str, torch.Tensor], pairs: list[LoraPair], where: str, alpha: float | None = None) -> MergeReport:
    """Merge ``pairs`` into ``weights`` (a module-path state dict, modified in place): W += (α/r)·B·A.

    α per target: the file's alpha key, else ``alpha``, else r (scale 1.0). Every target's
    ``<module>.weight`` must exist in ``weights``. Raises CheckpointError naming ``where``.
    """
    missing = [p.module for p in pairs if f"{p.module}.weight" not in weights]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} LoRA target(s) do not exist in the UNet (e.g. {missing[0]})")
    ranks, alphas, scales, convs = set(), set(), set(), 0
    for p in pairs:
        w = weights[f"{p.module}.weight"]
        a = p.alpha if p.alpha is not None else (alpha if alpha is not None else float(p.rank))
        scale = a / p.rank
        weights[f"{p.module}.weight"] = (w.double() + scale * lora_delta(p, tuple(w.shape), where)).to(w.dtype)
        ranks.add(p.rank)
        alphas.add(a)
        scales.add(scale)
        convs += w.ndim == 4
    return MergeReport(len(pairs), sorted(ranks), sorted(alphas), sorted(scales), convs)
