#!/usr/bin/env bash
# Runs every test: C++ (every kernel path the CPU has; KT_ISA-capped paths it lacks are reported as
# skipped, see docs/TESTING.md) and Python (against PyTorch and the checkpoints transformers made in
# testdata/), then the libFuzzer targets of kt/io for a bounded time each (tools/fuzz.sh). Needs nothing
# outside the repository but what tools/setup.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."

bazel test --jobs="$(nproc)" //... "$@"
tools/test_sft_integration.sh

# libFuzzer (clang, ASan + UBSan) on kt/io's parsers: KT_FUZZ_SECONDS per target (default 60; 0 skips).
if [ "${KT_FUZZ_SECONDS:-60}" != 0 ]; then
  tools/fuzz.sh
fi
