"""Pack the UTKFace faces for the GPU machine: center-crop + resize to 128 px with the toolchain's own
``square_resize``, JPEG quality 90, same file names (so the name-ordered held-out split is unchanged).
The full-size folder (27 MB) does not fit the device's 64 MiB transfer beside the working tree; this does (≈ 16 MB).

    python benchmarks/device/make_faces.py [FACES] [OUT]   (defaults ../shared/assets/faces/utkface, .carry_faces/utkface)
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from toolchain.calibration.dataset import square_resize

src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[3] / "shared/assets/faces/utkface")
out = Path(sys.argv[2] if len(sys.argv) > 2 else ".carry_faces/utkface")
out.mkdir(parents=True, exist_ok=True)
done = 0
for p in sorted(src.iterdir()):
    try:
        rgb = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0
    except OSError:
        continue
    Image.fromarray((square_resize(rgb, 128) * 255 + 0.5).astype(np.uint8)).save(out / p.name, quality=90)
    done += 1
print(done, "faces ->", out)
