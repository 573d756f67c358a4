#!/usr/bin/env bash
# Runs every test: C++ (every kernel path the CPU has; KT_ISA-capped paths it lacks are reported as
# skipped, see docs/TESTING.md) and Python (against PyTorch and the checkpoints transformers made in
# testdata/), the kt_kernel.sft integration tests in setup.sh's virtualenv (PyPI torch, transformers, PEFT:
# tools/test_sft_integration.sh), then the cheap C++ tests again under ASan + UBSan (KT_SANITIZE, below), then the libFuzzer
# targets of kt/io for a bounded time each (tools/fuzz.sh). Needs nothing outside the repository but what
# tools/setup.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."

bazel test --jobs="$(nproc)" //... "$@"
tools/test_sft_integration.sh

# AddressSanitizer + UndefinedBehaviorSanitizer (.bazelrc --config=asan) over the C++ tests whose build is
# cheaper: kt/io (convert pulls in the int8 GEMM), the quantizers and the thread pool. The GEMM, MoE and SFT
# tests are left to KT_SANITIZE=full (every C++ test): the full run took 46 minutes on the shared 2-core dev
# box, about 28 of them compiling gemm_int4_hwy.cc under ASan + UBSan, beyond CI's ~25-minute budget (see
# docs/TESTING.md). KT_SANITIZE=0 skips this step.
case "${KT_SANITIZE:-io}" in
  0) ;;
  full)
    bazel test --jobs="$(nproc)" --config=asan \
      $(bazel query 'kind(cc_test, //...)') "$@" ;;
  *)
    bazel test --jobs="$(nproc)" --config=asan \
      //kt/io/... //kt/kernels:quant_test //kt/kernels:act_quant_test //kt/kernels:dtype_test \
      //kt/kernels:cpu_features_test //kt/runtime:thread_pool_test //kt/runtime:memory_test "$@" ;;
esac

# libFuzzer (clang, ASan + UBSan) on kt/io's parsers: KT_FUZZ_SECONDS per target (default 60; 0 skips).
if [ "${KT_FUZZ_SECONDS:-60}" != 0 ]; then
  tools/fuzz.sh
fi
