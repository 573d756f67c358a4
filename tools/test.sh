#!/usr/bin/env bash
# Runs every test: C++ (every kernel path the CPU has; KT_ISA-capped paths it lacks are reported as
# skipped, see docs/TESTING.md) and Python (against PyTorch and the checkpoints transformers made in
# testdata/), the kt_kernel.sft integration tests in setup.sh's virtualenv (PyPI torch, transformers, PEFT:
# tools/test_sft_integration.sh), then every C++ test again under ASan + UBSan and the threaded ones under TSan (KT_SANITIZE, below), then the libFuzzer
# targets of kt/io for a bounded time each (tools/fuzz.sh). Needs nothing outside the repository but what
# tools/setup.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."

bazel test --jobs="$(nproc)" //... "$@"
tools/test_sft_integration.sh

# Sanitizers (.bazelrc --config=asan / --config=tsan; docs/TESTING.md): every C++ test under
# AddressSanitizer + UndefinedBehaviorSanitizer, and the tests tagged "threaded" (thread pool, task queue,
# MoE and SFT layers, conversion threads, ...) under ThreadSanitizer. --build_tests_only builds just those
# tests. On a CPU without AVX-512 the AVX-512 Highway targets cannot run, so their tests are skipped under the
# sanitizers as they are without them; compiling them anyway (Highway compiles every kernel once per target,
# and the instrumented compiles are the slowest of the suite) is left out there. KT_SANITIZE=0 skips this
# step, KT_SANITIZE=asan or tsan runs one of the two.
sanitizer_copts=()
if ! grep -qw avx512f /proc/cpuinfo; then
  sanitizer_copts=(--copt=-UHWY_DISABLED_TARGETS
                   "--copt=-DHWY_DISABLED_TARGETS=(HWY_SSSE3|HWY_SSE4|HWY_AVX3|HWY_AVX3_DL)")
fi
case "${KT_SANITIZE:-all}" in
  0) ;;
  all|asan|tsan)
    if [ "${KT_SANITIZE:-all}" != tsan ]; then
      bazel test --jobs="$(nproc)" --config=asan --build_tests_only --test_timeout=900 "${sanitizer_copts[@]}" \
        $(bazel query 'kind(cc_test, //...)') "$@"
    fi
    if [ "${KT_SANITIZE:-all}" != asan ]; then
      bazel test --jobs="$(nproc)" --config=tsan --build_tests_only --test_timeout=900 \
        "${sanitizer_copts[@]}" $(bazel query 'attr(tags, threaded, kind(cc_test, //...))') "$@"
    fi ;;
  *) echo "tools/test.sh: KT_SANITIZE must be 0, all, asan or tsan, got '${KT_SANITIZE}'" >&2; exit 2 ;;
esac

# libFuzzer (clang, ASan + UBSan) on kt/io's parsers: KT_FUZZ_SECONDS per target (default 60; 0 skips).
if [ "${KT_FUZZ_SECONDS:-60}" != 0 ]; then
  tools/fuzz.sh
fi
