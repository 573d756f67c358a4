#!/usr/bin/env bash
# On the AMX host: the kt_kernel Python tests with the host's Python 3.12 and torch, against the package,
# the 3.12 extension and the test checkpoints that pack.sh put in .device/, once with the best path and then with
# KT_ISA capping it to each path the host has. (The wheel test needs Bazel's wheel and is run here only.)
set -uo pipefail
cd "$(dirname "$0")/../.."
export LD_LIBRARY_PATH="$PWD/.device/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$PWD/.device/python:$PWD/.device/python/tests" KT_TESTDATA="$PWD/testdata/hf"
export KT_BIN="$PWD/.device/bin/kt"  # kt convert, for weight_path_test
status=0
# KT_SKIP_FULL_SUITE=1: only the capped runs (when the full suite already ran in an earlier call).
if [ -z "${KT_SKIP_FULL_SUITE:-}" ]; then
  python3 -m pytest -q .device/python/tests --ignore=.device/python/tests/wheel_test.py || status=1
fi
# The capped runs go side by side (each test uses 2 threads; the host has 16 CPUs): one after the other they
# take longer than a device call may run.
pids=()
for isa in avx2 avx512 avx512_vnni avx512_bf16 amx; do
  KT_ISA=$isa python3 -m pytest -q -p no:cacheprovider .device/python/tests/hf_fixtures_test.py \
    .device/python/tests/moe_bf16_test.py .device/python/tests/moe_int4_test.py \
    .device/python/tests/weight_path_test.py .device/python/tests/sft_test.py \
    .device/python/tests/native_int4_test.py > "/tmp/pytest_$isa.log" 2>&1 &
  pids+=("$!")
done
i=0
for isa in avx2 avx512 avx512_vnni avx512_bf16 amx; do
  if wait "${pids[$i]}"; then echo "KT_ISA=$isa: $(tail -n 1 "/tmp/pytest_$isa.log")"; else
    echo "KT_ISA=$isa FAILED:"; tail -n 30 "/tmp/pytest_$isa.log"; status=1; fi
  i=$((i + 1))
done
exit $status
