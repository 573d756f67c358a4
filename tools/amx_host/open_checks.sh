#!/usr/bin/env bash
# On the AMX/GPU host, one device call (< 10 min): what the open issues still need verified there, from the
# pack in .device/ (tools/amx_host/pack.sh). Logs go to $OUT (the device tool's folder; /tmp/kt_checks if
# unset); a summary is printed at the end.
#   tests:  the C++ tests on the best path (run_tests.sh: AMX), the kernel tests again under each AVX-512 cap
#           (KT_ISA=avx512_bf16 / avx512_vnni / avx512), and the GPU SFT parity at lr 1e-3 with its float64
#           noise floor (issue 17), side by side (the host has 16 CPUs; none of these is timed).
#   bench:  speed, nothing else running: FP8 vs BF16 AMX prefill at 512 and 4096 tokens (issue 15), decode of
#           every format at 16 threads with the paired yardstick (decode_probe; issues 15 and 18), AVX-512
#           prefill without AMX (issue 18), and the 235B layer at 4096 tokens against PyTorch's eager loop and
#           oneDNN's dense GEMMs of the same FLOPs (issue 18).
#   sft:    the SFT step at qlen 4096 (bf16, int8, int4 bases) with the share_backward_bb rebuild overlapped
#           and serial, alternating in one process, with per-phase times (issue 18's SFT item), and the
#           overlapped-rebuild test on the AMX path.
#   dense:  the 235B layer at 4096 tokens beside PyTorch's eager loop and oneDNN's dense GEMMs (issue 18).
#   gguf:   the GGUF float types' decode, kernel alone and the layer at 1/4/16 threads (issue 15).
# Usage: tools/amx_host/open_checks.sh tests|bench|sft|dense|gguf
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/kt_checks}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/.device/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
K=.device/bin/kt
lscpu | grep -E "Model name|^CPU\(s\)" > "$OUT/machine.txt"
nvidia-smi -L >> "$OUT/machine.txt" 2>&1

tests() {
  (timeout 400 tools/amx_host/run_tests.sh > "$OUT/run_tests.log" 2>&1; echo "rc=$?" >> "$OUT/run_tests.log") &
  (for isa in avx512_bf16 avx512_vnni avx512; do
     for t in gemm_fp8_test gemm_mx_test gemm_int4_test gemm_int8_test gemm_bf16_test gemm_gguf_test fp8_test; do
       if KT_ISA=$isa timeout 150 ".device/bin/$t" > "/tmp/isa_${isa}_$t.log" 2>&1; then
         echo "PASS KT_ISA=$isa $t ($(grep -c '^\[       OK' "/tmp/isa_${isa}_$t.log") ok, $(grep -c '^\[  SKIPPED' "/tmp/isa_${isa}_$t.log") skipped)"
       else echo "FAIL KT_ISA=$isa $t"; tail -n 40 "/tmp/isa_${isa}_$t.log"; fi
     done
   done > "$OUT/isa_tests.log" 2>&1) &
  if [ -z "${KT_CUDART:-}" ]; then
    KT_CUDART=$(python3 -c 'import glob, os, nvidia.cuda_runtime as n
print(sorted(glob.glob(os.path.join(list(n.__path__)[0], "lib", "libcudart.so*")))[0])' 2>/dev/null) && export KT_CUDART
  fi
  PYTHONPATH=.device/python:.device/python/tests_integration KT_TESTDATA=$PWD/testdata/hf \
    timeout 450 python3 tools/amx_host/sft_gpu_parity.py --device cuda --lr 1e-3 --floor --threads 8 \
    > "$OUT/parity_lr1e-3.log" 2>&1
  echo "rc=$?" >> "$OUT/parity_lr1e-3.log"
  wait
  grep -h -E "^(PASS|FAIL)|rc=" "$OUT/run_tests.log" "$OUT/isa_tests.log"
  tail -n 25 "$OUT/parity_lr1e-3.log"
}

bench() {
  local t0
  t0=$(date +%s)
  for q in 512 4096; do
    for f in bf16 fp8_block bf16 fp8_block; do  # alternated: the host's rate moves between calls
      echo "=== amx $f qlen $q"
      timeout 120 $K bench --threads 16 --no-torch --format $f --qlen-prefill $q --prefill-iters 3 --iters 50 2>&1 \
        | sed -n '/^Yardsticks/,$p'
    done
  done > "$OUT/fp8_vs_bf16.log" 2>&1
  echo "fp8 vs bf16: $(( $(date +%s) - t0 )) s"
  for s in 30b 235b; do
    for f in bf16 int8 int4 int4_group_sym fp8_block mxfp8 mxfp4; do  # int4_group_sym: RAWINT4 / GPTQ_INT4's kernels
      echo "=== decode_probe $f $s 16 threads"
      timeout 60 .device/bin/decode_probe --format=$f --shape=$s --threads=16 --iters=40 2>&1 \
        | grep -E "decode     median|ratio|yardstick"
    done
  done > "$OUT/decode16.log" 2>&1
  echo "decode: $(( $(date +%s) - t0 )) s"
  for spec in "avx512_bf16 bf16" "avx512_vnni int8"; do
    set -- $spec
    for q in 512 4096; do
      echo "=== KT_ISA=$1 $2 qlen $q"
      KT_ISA=$1 timeout 150 $K bench --threads 16 --no-torch --format "$2" --qlen-prefill $q --prefill-iters 2 \
        --iters 30 2>&1 | sed -n '/^Yardsticks/,$p'
    done
  done > "$OUT/avx512_prefill.log" 2>&1
  echo "avx512: $(( $(date +%s) - t0 )) s"
  for f in bf16 int8; do
    echo "=== amx $f qwen3-235b-a22b qlen 4096, PyTorch eager + dense"
    timeout 200 $K bench --threads 16 --shape qwen3-235b-a22b --format $f --qlen-prefill 4096 --prefill-iters 3 \
      --iters 30 --python python3 --torch-script .device/bin/torch_moe_bench.py 2>&1 \
      | sed -n '/^Yardsticks/,$p'
  done > "$OUT/amx_235b.log" 2>&1
  echo "235b: $(( $(date +%s) - t0 )) s"
  grep -h -E "===|latency|compute |PASS|FAIL|decode     median|ratio      decode|dense|kt/torch" "$OUT"/fp8_vs_bf16.log "$OUT"/decode16.log \
    "$OUT"/avx512_prefill.log "$OUT"/amx_235b.log | head -120
}

sft() {
  .device/bin/sft_layer_sharing_test --gtest_filter='*OverlappedRebuild*' 2>&1 | tail -n 3
  for m in "AMXBF16_SFT --iters 3" "AMXINT8_SFT --iters 3" "AMXINT4_SFT --iters 2"; do
    echo "=== $m"
    # shellcheck disable=SC2086
    PYTHONPATH=.device/python timeout 180 python3 .device/bin/sft_bench.py --qlen 4096 --threads 16 \
      --share-backward-bb --alternate-layers --torch-iters 0 --method $m 2>&1 | tail -n 25
  done > "$OUT/sft.log" 2>&1
  grep -E "===|seconds|phases|TFLOPS" "$OUT/sft.log" | head -60
}

# The 235B layer at 4096 tokens beside PyTorch's eager loop and oneDNN's dense bf16 and int8 GEMMs of the same
# FLOPs (issue 18's AMX item; the bench mode's run of it printed no PyTorch figures before `--python python3`
# was looked up on $PATH).
dense() {
  for f in bf16 int8; do
    echo "=== amx $f qwen3-235b-a22b qlen 4096, PyTorch eager + dense"
    timeout 240 $K bench --threads 16 --shape qwen3-235b-a22b --format $f --qlen-prefill 4096 --prefill-iters 2 \
      --iters 10 --python python3 --torch-script .device/bin/torch_moe_bench.py 2>&1 | sed -n '/^Yardsticks/,$p'
  done > "$OUT/dense_235b.log" 2>&1
  grep -E "===|compute  |  (decode|prefill|dense) |skipped" "$OUT/dense_235b.log"
}

# GGUF's float types decode at 16-34% of the read bandwidth on this host (2026-12-07) while the same kernel
# reads ~7 GB/s per thread on a Zen 3 core: the kernel alone per path (1 thread) and the layer's decode at
# 1, 4 and 16 threads say whether the kernel or the threads are at fault.
gguf() {
  .device/bin/gemm_gguf_benchmark --benchmark_filter='M:1/N:768/K:2048/type:(4|10|11)$' --benchmark_min_time=0.1 \
    2>/dev/null | grep BM_ | awk '{print $1, $(NF-2), $NF}'
  for t in bf16 f16 q8_0; do
    for th in 1 4 16; do
      PYTHONPATH=.device/python timeout 60 python3 .device/bin/gguf_bench.py --json --types=$t --threads $th \
        --tokens=1 --decode-iters 20 2>/dev/null | tail -n 1 | cut -c1-240
    done
  done
}

case "${1:-}" in
  tests) tests ;;
  bench) bench ;;
  sft) sft ;;
  dense) dense ;;
  gguf) gguf ;;
  *) echo "usage: $0 tests|bench|sft|dense|gguf" >&2; exit 2 ;;
esac
