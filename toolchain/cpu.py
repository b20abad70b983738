"""What integer units this CPU has: the ISA features that decide which kernels runtimes pick.

ONNX Runtime's MLAS, XNNPACK and PyTorch all choose their int8 kernels by CPUID at run time
(AVX2 → 16-bit pair sums that can saturate for u8·s8; AVX-512-VNNI / AVX-VNNI → exact 32-bit dot
products; AMX tiles on Sapphire Rapids and later; NEON dot-product / i8mm on ARM). Reports name
these features so a parity or latency figure says which kernels produced it.
"""

from __future__ import annotations

import platform
from typing import Any


def cpu_isa() -> dict[str, Any]:
    """The host CPU's architecture and integer-relevant ISA features, read through CPUID.

    Returns ``{"machine": "x86_64" | "aarch64" | …, "capability": PyTorch's dispatch level
    ("AVX2", "AVX512", "SVE256", "DEFAULT", …), "features": [...]}`` where features lists the
    supported members of avx2, avx512, avx512_vnni, avx512_bf16, amx_tile, amx_fp16. Uses PyTorch's
    bundled cpuinfo (CPUID, so an emulated CPU reports what it emulates, unlike /proc/cpuinfo).
    Never raises: unknown features are left out.
    """
    import torch

    probes = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported", "avx512_vnni": "_is_vnni_supported",
              "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported", "amx_fp16": "_is_amx_fp16_supported"}
    features = []
    for name, fn in probes.items():
        try:
            if getattr(torch.cpu, fn)():
                features.append(name)
        except (AttributeError, RuntimeError):
            continue
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return {"machine": platform.machine(), "capability": capability, "features": features}
