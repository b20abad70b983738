#!/usr/bin/env bash
# Integer vs float TFLite latency at the osdface preset (512 px) on the GPU machine's CPU (device tool).
# The machine has torch but not the LiteRT converter: carry .carry_tfl/site.tar.xz (made by
# benchmarks/device/make_bundle.sh from the cp312 wheels, stripped to fit the 64 MiB carry).
# Resumable: rows live in benchmarks/.cache/tflite_osdface (kept between calls while the machine is warm).
#   usage (device tool, carry [".carry_tfl"]): bash benchmarks/device/tflite_osdface.sh SECONDS VARIANTS [PARTS]
set -uo pipefail
budget=${1:-540}; variants=${2:-float,w4a4:int8}; parts=${3:-unet,vae_decoder}
start=$(date +%s)
if [ ! -d /tmp/site/site ]; then mkdir -p /tmp/site && xz -dc .carry_tfl/site.tar.xz | tar xf - -C /tmp/site; fi
export PYTHONPATH=/tmp/site/site TF_CPP_MIN_LOG_LEVEL=2
work=benchmarks/.cache/tflite_osdface
mkdir -p $work "${OUT:-/tmp/out}"
lscpu | grep -E "Model name|^CPU\(s\)" > $work/cpu.txt
grep -o -w -E "avx2|avx512f|avx512_vnni|avx_vnni|amx_int8|amx_tile" /proc/cpuinfo | sort -u | tr '\n' ' ' >> $work/cpu.txt
cat $work/cpu.txt
left=$(( budget - ($(date +%s) - start) ))
timeout -s INT $left python3 benchmarks/tflite_latency.py --preset osdface --parts "$parts" --variants "$variants" \
    --threads 16 --runs 3 --warmup 1 --images 2 --validate-images 1 --work $work --out $work/out 2>&1 \
    | grep -v -E "Calibration::|Quantization Parameters::|Transformations to tensors::|^\(|^ExportedProgram|^MLIR Module|^Decompositions" | tail -40
cp $work/out/results.* $work/cpu.txt "${OUT:-/tmp/out}/" 2>/dev/null; tar cf "${OUT:-/tmp/out}/rows.tar" -C $work rows
ls $work/rows
