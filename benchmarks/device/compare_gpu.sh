#!/usr/bin/env bash
# Issue 19 on one 2-GPU host in one lease: train `ref-l` on GPU 0 while GPU 1 runs the paper-budget comparison
# on `ref`, then the same comparison on the new `ref-l` on both GPUs; results come home in 15 MB parts.
# Everything runs in a background session (setsid) so that it outlives each 10-minute device call; the calls
# only wait and collect. Work lives in /tmp/g on the warm machine. Calls, in order (nothing between them):
#   1 (carry .carry_faces):  bash benchmarks/device/compare_gpu.sh faces
#   2 (carry .carry_pk):     bash benchmarks/device/compare_gpu.sh start; bash benchmarks/device/compare_gpu.sh wait 540
#   3..:                     bash benchmarks/device/compare_gpu.sh collect SECONDS   (waits up to SECONDS for parts)
# Deadlines (seconds after `start`): ref-l training stops at TRAIN_MIN minutes; no comparison job starts after
# START_BY, and any still running at KILL_AT is stopped and reported (status json).
set -uo pipefail
mode=$1
G=/tmp/g
TRAIN_MIN=${TRAIN_MIN:-9}
START_BY=${START_BY:-960}
KILL_AT=${KILL_AT:-1140}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

status() {
  date -u +%T; nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
  grep -a -E "held|step|PSNR|rror" $G/train.log 2>/dev/null | tr '\r' '\n' | grep -v "^\s*$" | tail -3
  for s in $G/ref_status.json $G/refl_status.json; do
    [ -f $s ] && python3 -c "import json,collections,sys; d=json.load(open('$s')); c=collections.Counter(v['state'] for v in d['jobs'].values()); print('$s', d['elapsed_s'], dict(c)); [print('  ', k, v.get('seconds')) for k, v in d['jobs'].items() if v['state'] in ('done','failed')]"
  done
  ls $G/pack 2>/dev/null
}

case $mode in
faces)
  rm -rf /tmp/faces && mkdir -p /tmp/faces && cp -r .carry_faces/utkface /tmp/faces/
  ls /tmp/faces/utkface | wc -l; nvidia-smi --query-gpu=name,memory.total --format=csv; nproc
  python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.device_count())"
  python3 -c "import importlib.util as u; print({m: u.find_spec(m) is not None for m in ['scipy','PIL','safetensors','huggingface_hub','matplotlib','jsonschema','tqdm','regex','mip']})"
  ;;
start)
  mkdir -p $G/pack /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry_pk/*.whl
  python3 -c "import zipfile; zipfile.ZipFile('.carry_pk/stlpips_site.zip').extractall('/tmp/site')"
  # the method registry finds methods through the package's entry points: without an install, a dist-info
  # holding them (from pyproject.toml) must be on the path, else every compare job fails at once
  python3 - <<'EOF2' || exit 1
import os, tomllib
ep = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]
root = "/tmp/site/quantface_toolchain-0.0.0.dist-info"; os.makedirs(root, exist_ok=True)
open(root + "/METADATA", "w").write("Metadata-Version: 2.1\nName: quantface-toolchain\nVersion: 0.0.0\n")
open(root + "/entry_points.txt", "w").write("".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in e.items()) + "\n" for g, e in ep.items()))
EOF2
  python3 -c "import importlib.metadata as m; assert m.entry_points(group='quantface.methods'), 'no entry points'" || exit 1
  python3 -c "import toolchain.compare, toolchain.methods, diffusers, stlpips_pytorch, jsonschema; print('imports ok')" || exit 1
  python3 - <<'EOF' || exit 1
from pathlib import Path
from benchmarks.common import face_sets
c, e = face_sets(Path("/tmp/faces/utkface"), n_calib=512, n_eval=64)
print("sets", c, e)
EOF
  cat > $G/orchestrate.sh <<EOF
cd $PWD
T0=\$(date +%s)
C=benchmarks/.cache/calib_n512_s128_seed0; E=benchmarks/.cache/heldout_n64_s128_seed1
CUDA_VISIBLE_DEVICES=0 python3 -m toolchain train-reference --preset ref-l --faces /tmp/faces/utkface --steps 2400 --batch-size 64 --lr 0.0003 \
  --val-faces 64 --eval-every 400 --patience 4 --min-delta 0.02 --workers 12 --device cuda --max-minutes $TRAIN_MIN \
  --out $G/ref-l.safetensors --workdir $G/work_ref_l --model-card $G/MODEL_CARD.md > $G/train.log 2>&1 &
TR=\$!
python3 benchmarks/compare_gpu.py run --spec benchmarks/compare_gpu.json --model toolchain/weights/ref.safetensors --calib \$C --eval \$E \
  --work $G/ref_work --gpus 1 --jobs-per-gpu 6 --start-by $START_BY --kill-at $KILL_AT --status $G/ref_status.json > $G/ref_run.log 2>&1 &
RR=\$!
wait \$TR
mkdir -p $G/pack/0_refl_weights
split -b 15000000 -d $G/ref-l.safetensors $G/pack/0_refl_weights/ref-l.safetensors.part
tar cf $G/pack/0_refl_weights/ref-l_training.tar -C $G MODEL_CARD.md train.log work_ref_l/training_info.json work_ref_l/val_history.json work_ref_l/loss_curve.png
sha256sum $G/ref-l.safetensors > $G/pack/0_refl_weights/ref-l.sha256
EL=\$(( \$(date +%s) - T0 ))
python3 benchmarks/compare_gpu.py run --spec benchmarks/compare_gpu.json --model $G/ref-l.safetensors --calib \$C --eval \$E \
  --work $G/refl_work --gpus 0,1 --jobs-per-gpu 6 --start-by \$(( $START_BY - EL )) --kill-at \$(( $KILL_AT + 30 - EL )) \
  --status $G/refl_status.json > $G/refl_run.log 2>&1
cp $G/refl_status.json $G/refl_work/status.json
python3 benchmarks/compare_gpu.py pack --work $G/refl_work --calib \$C --eval \$E --to $G/pack/1_refl/compare_refl_gpu
wait \$RR
cp $G/ref_status.json $G/ref_work/status.json
python3 benchmarks/compare_gpu.py pack --work $G/ref_work --calib \$C --eval \$E --to $G/pack/2_ref/compare_ref_gpu
touch $G/ALL_DONE
EOF
  setsid nohup bash $G/orchestrate.sh > $G/orchestrate.log 2>&1 < /dev/null &
  sleep 5; echo started
  ;;
wait)
  sleep "$2"; status
  ;;
collect)
  end=$(( $(date +%s) + $2 ))
  while [ $(date +%s) -lt $end ]; do
    n=$(find $G/pack -name "*.part*" -o -name "*.tar" -o -name "*.sha256" | wc -l)
    [ -f $G/ALL_DONE ] && break
    [ "$n" -ge 4 ] && break
    sleep 5
  done
  status
  mkdir -p "$OUT/r"
  # weights first, then ref-l's comparison, then ref's; at most 4 files of <= 15 MB plus small ones
  k=0; m=0
  for f in $(find $G/pack -type f | sort); do
    sz=$(stat -c %s "$f")
    [ $m -ge 8 ] && break
    if [ $sz -gt 1000000 ]; then [ $k -ge 4 ] && continue; k=$((k+1)); fi
    mv "$f" "$OUT/r/"; m=$((m+1))
  done
  ls -la "$OUT/r"; [ -f $G/ALL_DONE ] && echo ALL_DONE; find $G/pack -type f | wc -l
  tail -3 $G/orchestrate.log
  ;;
esac
