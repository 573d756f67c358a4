#!/usr/bin/env bash
# Builds the C++ tests and benchmarks with -c opt, statically linking kt's own libraries, and copies them with
# the Debian shared libraries they need into .device/ (git-ignored), ready to carry to the AMX host, which
# has no Bazel (see docs/BUILD-OFFLINE.md). On the host: tools/amx_host/run_tests.sh.
# The builds use their own output bases and make no convenience symlinks (--symlink_prefix=/), so that the
# workspace's bazel-<folder> link keeps pointing at the default output base and `bazel test //...` stays
# clean whatever the clone's folder is called.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.device
targets=(
  //kt/kernels:dtype_test //kt/kernels:cpu_features_test //kt/kernels:gemm_bf16_test
  //kt/kernels:activation_test //kt/kernels:quant_test //kt/kernels:gemm_int8_test
  //kt/kernels:gemm_int8_benchmark //kt/kernels:gemm_int4_test //kt/kernels:gemm_int4_benchmark
  //kt/kernels:act_quant_test //kt/kernels:quant_fast_test //kt/kernels:quant_fast_benchmark
  //kt/runtime:thread_pool_test //kt/runtime:memory_test //kt/moe:moe_layer_test
  //kt/sft:sft_reference_test //kt/sft:sft_layer_test //kt/kernels:lora_kernels_test
  //kt/kernels:hwy_dispatch_test //kt/kernels:lora_kernels_benchmark
  //kt/kernels:gemm_bf16_benchmark //kt/moe:moe_benchmark //tools:kt //tools:decode_probe
  //kt/runtime:task_queue_test //kt/runtime:cuda_stream_gpu_test //kt/moe:serving_test
  //kt/moe:tp_layer_test //kt/moe:moe_layer_load_test //kt/moe:packed_experts_test //kt/moe:expert_format_test
  //kt/moe:routing_test //kt/sft:sft_layer_sharing_test
  //kt/kernels:fp8_test //kt/kernels:gemm_fp8_test //kt/kernels:gemm_fp8_benchmark
  //kt/kernels:gemm_mx_test //kt/kernels:gemm_mx_benchmark
  //kt/runtime:task_queue_benchmark //kt/runtime:numa_test //kt/moe:gpu_expert_buffers_test //kt/io:convert_test
  //kt/moe:gpu_expert_buffers_int4_test
  //kt/kernels:gemm_gguf_test //kt/kernels:gemm_gguf_benchmark //kt/moe:gguf_loader_test //kt/io:gguf_experts_test
)
bazel --output_base=/tmp/bazel_pack build -c opt --dynamic_mode=off --symlink_prefix=/ --jobs="$(nproc)" "${targets[@]}" >&2
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
# The SFT benchmark is Python (kt_kernel + torch): PYTHONPATH=.device/python python3 .device/bin/sft_bench.py
cp tools/sft_bench.py "$out/bin/"
# The serving runtime's overhead and overlap: PYTHONPATH=.device/python python3 .device/bin/serving_bench.py
cp tools/serving_bench.py "$out/bin/"
# Method LLAMAFILE on a synthetic GGUF layer: PYTHONPATH=.device/python python3 .device/bin/gguf_bench.py
cp tools/gguf_bench.py "$out/bin/"
# The same beside llama.cpp's peer, one table (it finds gguf_bench.py beside itself): python3
# .device/bin/peers_bench.py --gguf q8_0,q4_0,q4_K,bf16,f16 --kt .device/bin/kt --kt-pythonpath .device/python
#   --peers PEERS_DIR --threads 16
cp tools/peers_bench.py "$out/bin/"

# The Python package for the AMX host's Python 3.12: the extension built against 3.12's headers (from
# pyenv here, KT_PY312_INCLUDE to override), the package's .py files, its tests and the checkpoints of
# testdata/hf they read (from the working tree, which travels with every call; a copy here would push the
# carry past the device tool's 64 MiB). KT_PACK_NO_PYTHON=1 skips it (C++-only runs).
py312_include="${KT_PY312_INCLUDE:-$(pyenv root 2>/dev/null || echo /root/.pyenv)/versions/3.12.1/include/python3.12}"
if [ -n "${KT_PACK_NO_PYTHON:-}" ]; then
  echo "pack.sh: KT_PACK_NO_PYTHON set; skipping the Python package" >&2
elif [ -f "$py312_include/Python.h" ]; then
  repo=/tmp/kt_python312_headers
  rm -rf "$repo" && mkdir -p "$repo"
  cp -r "$py312_include"/. "$repo/"
  echo 'workspace(name = "python_headers")' > "$repo/WORKSPACE"
  cp third_party/python_headers.BUILD "$repo/BUILD"
  bazel --output_base=/tmp/bazel_pack312 build -c opt --symlink_prefix=/ --override_repository=python_headers="$repo" \
    --jobs="$(nproc)" //kt/python:kt_kernel/_kt.so >&2
  bin312=$(bazel --output_base=/tmp/bazel_pack312 info -c opt bazel-bin 2>/dev/null)
  mkdir -p "$out/python"
  cp -r kt/python/kt_kernel "$out/python/"
  cp "$bin312/kt/python/kt_kernel/_kt.so" "$out/python/kt_kernel/"
  cp -r kt/python/tests "$out/python/"
  # kt_kernel.sft's integration tests and the GPU parity script built on their tiny models:
  #   PYTHONPATH=.device/python:.device/python/tests_integration KT_TESTDATA=$PWD/testdata/hf \
  #     python3 .device/bin/sft_gpu_parity.py --device cuda --bench
  cp -r kt/python/tests_integration "$out/python/"
  cp tools/amx_host/sft_gpu_parity.py "$out/bin/"
else
  echo "pack.sh: no Python 3.12 headers at $py312_include; skipping the Python package" >&2
fi
du -sh "$out" >&2
