#!/usr/bin/env bash
# Builds the C++ tests and benchmarks with -c opt, statically linking kt's own libraries, and copies them with
# the Debian shared libraries they need into .device/ (git-ignored), ready to carry to the AMX host, which
# has no Bazel (see ../shared/design/BUILD-OFFLINE.md). On the host: tools/amx_host/run_tests.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.device
targets=(
  //kt/kernels:dtype_test //kt/kernels:cpu_features_test //kt/kernels:gemm_bf16_test
  //kt/kernels:activation_test //kt/kernels:quant_test
  //kt/moe:thread_pool_test //kt/moe:moe_bf16_test
  //kt/kernels:gemm_bf16_benchmark //kt/moe:moe_benchmark //tools:kt
)
bazel --output_base=/tmp/bazel_pack build -c opt --dynamic_mode=off --jobs="$(nproc)" "${targets[@]}" >&2
bin=$(bazel --output_base=/tmp/bazel_pack info -c opt --dynamic_mode=off bazel-bin 2>/dev/null)
rm -rf "$out" && mkdir -p "$out/bin" "$out/lib"
for t in "${targets[@]}"; do
  path="$bin/$(echo "${t#//}" | tr ':' '/')"
  cp "$path" "$out/bin/"
  # Debian libraries the binary loads, except the C/C++ runtime the host has in a newer version.
  ldd "$path" | awk '$3 ~ /^\// {print $3}' | grep -v -E '/(libc|libm|libstdc\+\+|libgcc_s|libpthread|libdl|librt)\.so' \
    | while read -r lib; do [ -e "$out/lib/$(basename "$lib")" ] || cp -L "$lib" "$out/lib/"; done || true
done
cp tools/torch_moe_bench.py "$out/bin/" 2>/dev/null || true
du -sh "$out" >&2
