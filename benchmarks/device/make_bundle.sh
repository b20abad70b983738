#!/usr/bin/env bash
# Pack the LiteRT converter stack for the device tool's Python 3.12 (no index there): cp312 wheels
# unpacked, large shared objects stripped, GPU/vendor plugins dropped, xz -9 (≈ 53 MB, under the carry limit).
#   usage: bash benchmarks/device/make_bundle.sh WHEEL_DIR   (wheels: pip download --python-version 3.12 ...)
set -euo pipefail
wheels=$1; root=$(mktemp -d)
mkdir -p "$root/site" .carry_tfl
for w in "$wheels"/*.whl; do unzip -q -o "$w" -d "$root/site"; done
rm -rf "$root/site/tests" "$root/site/ai_edge_litert/vendors" "$root/site/ai_edge_litert/libLiteRtWebGpuAccelerator.so" "$root/site/ai_edge_litert/tools/apply_plugin_main"
find "$root/site" -name "*.so" -size +1M -exec strip --strip-unneeded {} \;
tar cf - -C "$root" site | xz -9 -T0 > .carry_tfl/site.tar.xz
rm -rf "$root"; ls -la .carry_tfl/site.tar.xz
