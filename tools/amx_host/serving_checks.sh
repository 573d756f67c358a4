#!/usr/bin/env bash
# On the GPU host: the serving runtime's checks and figures from the pack in .device/ (tools/amx_host/pack.sh):
# the queue's submit + sync cost without CUDA (task_queue_benchmark) and through a CUDA stream
# (cuda_stream_gpu_test prints it), tools/serving_bench.py (overhead per call as Python sees it; a multi-layer
# decode step overlapped against its serial parts), and kt/python/examples/generate.py in hybrid mode (kt on
# a side stream, masked experts on the GPU) against plain transformers on three test checkpoints, with
# prompts whose reference margins decide the tokens (see tests_integration/test_generate.py).
set -uo pipefail
cd "$(dirname "$0")/../.."
export LD_LIBRARY_PATH="$PWD/.device/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$PWD/.device/python"
if [ -z "${KT_CUDART:-}" ]; then
  KT_CUDART=$(python3 -c 'import glob, os, nvidia.cuda_runtime as n
print(sorted(glob.glob(os.path.join(list(n.__path__)[0], "lib", "libcudart.so*")))[0])' 2>/dev/null) && export KT_CUDART
fi
status=0
echo "== task_queue_benchmark"
.device/bin/task_queue_benchmark --benchmark_min_time=0.2 2>&1 | grep -E "^BM_|^CPU|Run on" || status=1
echo "== cuda_stream_gpu_test (overhead line)"
.device/bin/cuda_stream_gpu_test 2>&1 | grep -E "per call|PASSED|FAILED|SKIPPED" || status=1
echo "== serving_bench.py ${KT_SERVING_BENCH_ARGS:-}"
# shellcheck disable=SC2086
python3 .device/bin/serving_bench.py ${KT_SERVING_BENCH_ARGS:-} || status=1
echo "== generate.py --device cuda --check"
hf=testdata/hf
for run in "deepseek_v3 --num-gpu-experts 3 --prompt-ids 22 44 26 19 47 49 18 21" \
           "qwen3_moe --gpu-experts-mask 1,4,6 --prompt-ids 39 11 0 41 11 16 3 2" \
           "mixtral --prompt-ids 47 19 38 53 12 52 24 57"; do
  set -- $run
  model=$1; shift
  if python3 kt/python/examples/generate.py --model "$hf/$model" --device cuda --check --max-new-tokens 12 "$@" \
      > "/tmp/generate_$model.log" 2>&1; then
    echo "PASS $model: $(grep -iE 'equal|tokens/s' "/tmp/generate_$model.log" | tr '\n' ' ' | cut -c1-300)"
  else
    echo "FAIL $model"; tail -n 25 "/tmp/generate_$model.log"; status=1
  fi
done
exit $status
