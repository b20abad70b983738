"""Run every ``NAME.onnx`` of a folder on its ``NAME.npz`` inputs in ONNX Runtime — a default session
and one with all graph optimisations off — and write ``NAME.default.npy`` / ``NAME.no_optimizations.npy``.

The tests start it under ``qemu-x86_64 -cpu Haswell`` to get ORT's kernels for a CPU with AVX2 but
no AVX-512 and no VNNI (qemu's CPUID answers for the emulated model, so ORT's MLAS picks its AVX2
paths), whatever CPU runs the suite. It imports numpy and onnxruntime only (torch is slow to load
under emulation); ``--isa`` also records what PyTorch's CPUID probe sees, to check the emulation.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main(folder: str, isa: bool = False) -> None:
    root = Path(folder)
    for path in sorted(root.glob("*.onnx")):
        feeds = dict(np.load(path.with_suffix(".npz")))
        for name, level in (("default", ort.GraphOptimizationLevel.ORT_ENABLE_ALL), ("no_optimizations", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)):
            so = ort.SessionOptions()
            so.graph_optimization_level = level
            so.intra_op_num_threads = 2  # fixed: MLAS float conv sums depend on the thread count (test_export_onnx)
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            np.save(root / f"{path.stem}.{name}.npy", sess.run(None, feeds)[0])
    if isa:
        import torch

        (root / "isa.json").write_text(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                                                   "vnni": bool(torch.cpu._is_vnni_supported()),
                                                   "avx512": bool(torch.cpu._is_avx512_supported())}))


if __name__ == "__main__":
    main(sys.argv[1], "--isa" in sys.argv[2:])
