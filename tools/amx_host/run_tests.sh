#!/usr/bin/env bash
# On the AMX host: runs the carried C++ tests (every path the CPU has) from .device/. Prints one summary line
# per test binary; exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
export LD_LIBRARY_PATH="$PWD/.device/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# cuda_stream_gpu_test reaches CUDA through dlopen, like kt: without a libcudart on the library path, use
# PyTorch's (pip's nvidia-cuda-runtime package).
if [ -z "${KT_CUDART:-}" ]; then
  KT_CUDART=$(python3 -c 'import glob, os, nvidia.cuda_runtime as n
print(sorted(glob.glob(os.path.join(list(n.__path__)[0], "lib", "libcudart.so*")))[0])' 2>/dev/null) && export KT_CUDART
fi
status=0
for t in dtype_test cpu_features_test gemm_bf16_test gemm_int8_test gemm_int4_test activation_test quant_test \
    act_quant_test quant_fast_test thread_pool_test memory_test moe_layer_test moe_layer_load_test \
    packed_experts_test expert_format_test routing_test sft_reference_test sft_layer_test sft_layer_sharing_test \
    lora_kernels_test hwy_dispatch_test fp8_test gemm_fp8_test gemm_mx_test numa_test gpu_expert_buffers_test convert_test task_queue_test serving_test tp_layer_test cuda_stream_gpu_test \
    gpu_expert_buffers_int4_test gemm_gguf_test gguf_loader_test gguf_experts_test; do
  if .device/bin/$t > "/tmp/$t.log" 2>&1; then
    echo "PASS $t ($(grep -c '^\[       OK' "/tmp/$t.log") ok, $(grep -c '^\[  SKIPPED' "/tmp/$t.log") skipped)"
  else
    echo "FAIL $t"; tail -n 30 "/tmp/$t.log"; status=1
  fi
  grep -h "worst" "/tmp/$t.log" || true
done
exit $status
