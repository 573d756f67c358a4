#!/usr/bin/env bash
# Runs every test: C++ (every kernel path the CPU has; KT_ISA-capped paths it lacks are reported as
# skipped, see docs/TESTING.md) and Python (against PyTorch and the Hugging Face fixtures in ../shared),
# then the libFuzzer targets of kt/io for a bounded time each (tools/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

fixtures="${KT_FIXTURES:-$(cd .. && pwd)/shared/fixtures}"
if [ ! -d "$fixtures/hf" ]; then
  echo "test.sh: fixtures not found at $fixtures (set KT_FIXTURES to the shared/fixtures folder)" >&2
  exit 1
fi

bazel test --jobs="$(nproc)" --test_env=KT_FIXTURES="$fixtures" //... "$@"

# libFuzzer (clang, ASan + UBSan) on kt/io's parsers: KT_FUZZ_SECONDS per target (default 60; 0 skips).
if [ "${KT_FUZZ_SECONDS:-60}" != 0 ]; then
  tools/fuzz.sh
fi
