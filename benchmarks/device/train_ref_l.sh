#!/usr/bin/env bash
# Train the `ref-l` reference model on the GPU machine (one H200), resumable across the device's
# 10-minute calls: the work folder is in /tmp on the warm machine (git-ignored folders of the repo were
# not kept between calls: a run there restarted from step 0), each call trains until its time cap,
# and every call leaves a usable model (best-validated weights) in $OUT, split in 15 MB pieces
# (the device returns files of at most 16 MiB; `cat ref-l.safetensors.part* > ref-l.safetensors`).
#   call 1 (carry .carry_faces):  bash benchmarks/device/train_ref_l.sh faces
#   call 2.. (carry .carry_pk):   bash benchmarks/device/train_ref_l.sh train STEPS MINUTES
# .carry_faces/utkface: ../shared/assets/faces/utkface center-cropped to 128 px (toolchain's
# square_resize), JPEG quality 90, same file names (so the held-out split is the same);
# .carry_pk: the diffusers wheel and stlpips_pytorch with its AlexNet weights only.
set -euo pipefail
mode=$1
if [ "$mode" = faces ]; then
  rm -rf /tmp/faces && mkdir -p /tmp/faces && cp -r .carry_faces/utkface /tmp/faces/
  ls /tmp/faces/utkface | wc -l; nvidia-smi --query-gpu=name,memory.total --format=csv; exit 0
fi
steps=$2; minutes=$3
if [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry_pk/diffusers-*.whl
  python3 -c "import zipfile; zipfile.ZipFile('.carry_pk/stlpips_site.zip').extractall('/tmp/site')"
fi
export PYTHONPATH=/tmp/site:$PWD
faces=/tmp/faces/utkface; [ -d "$faces" ] || faces=.carry_faces/utkface
mkdir -p .gpu_work
python3 -m toolchain train-reference --preset ref-l --faces "$faces" --steps "$steps" --batch-size 32 \
  --val-faces 64 --eval-every 500 --patience 4 --min-delta 0.02 --workers 14 --device cuda \
  --out .gpu_work/ref-l.safetensors --workdir /tmp/work_ref_l --model-card .gpu_work/MODEL_CARD.md \
  --max-minutes "$minutes" 2>&1 | tr '\r' '\n' | grep -v "^\s*$" | awk 'NR % 20 == 1 || /error|Error|held|PSNR|step/' | tail -60
mkdir -p "$OUT/ref_l"
split -b 15000000 -d .gpu_work/ref-l.safetensors "$OUT/ref_l/ref-l.safetensors.part"
cp .gpu_work/MODEL_CARD.md /tmp/work_ref_l/training_info.json /tmp/work_ref_l/val_history.json \
   /tmp/work_ref_l/loss_curve.png "$OUT/ref_l/" 2>/dev/null || true
sha256sum .gpu_work/ref-l.safetensors
