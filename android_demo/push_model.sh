#!/usr/bin/env bash
# Push an exported model and its precision sidecar to the phone's Download folder, where the
# app's "Model" and "Table" pickers find them:   android_demo/push_model.sh out/model.tflite
set -euo pipefail
model="${1:?usage: $0 MODEL.tflite}"
[ -f "$model" ] || { echo "no such model: $model" >&2; exit 1; }
adb push "$model" /sdcard/Download/
table="${model%.tflite}.precision.json"
if [ -f "$table" ]; then adb push "$table" /sdcard/Download/; else echo "note: $table not found (export writes it beside the model)" >&2; fi
