#!/usr/bin/env bash
# On the AMX host: the qlen at which AMX tiles overtake the decode kernels in the whole layer. Runs
# `kt bench` (Qwen3-30B-A3B shape, 16 threads) at several prefill qlens with KT_ISA capping the path to
# amx and to the best non-AMX path, for bf16 (decode kernel: vdpbf16ps) and int8 (vpdpbusd), and prints
# one line per (format, qlen): median latency of each path. Usage: tools/amx_host/crossover.sh [qlen...]
set -uo pipefail
cd "$(dirname "$0")/../.."
export LD_LIBRARY_PATH="$PWD/.device/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
qlens=("$@")
[ ${#qlens[@]} -eq 0 ] && qlens=(4 8 16 32 64 128 256)
median() {  # prints the prefill median latency of one kt bench run
  KT_ISA="$1" .device/bin/kt bench --threads 16 --no-torch --format "$2" --qlen-prefill "$3" --iters 5 \
    --prefill-iters 9 --bandwidth-mib 64 2>&1 | sed -n 's/^  latency     median \([^ ]* [^ ]*\) per layer  (min.*/\1/p'
}
for fmt in bf16 int8; do
  for q in "${qlens[@]}"; do
    echo "$fmt qlen $q: amx $(median amx "$fmt" "$q"), avx512_bf16 $(median avx512_bf16 "$fmt" "$q")"
  done
done
