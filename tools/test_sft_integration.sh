#!/usr/bin/env bash
# Runs kt/python/tests_integration (kt_kernel.sft with PyPI torch 2.x, transformers 5 and PEFT on tiny
# random MoE models) with the virtualenv tools/setup.sh makes (the same folder: KT_SFT_VENV, else named by
# the hash of tools/sft_venv_requirements.txt). Bazel's py_tests run
# Debian's torch 1.13, which transformers 5 does not support, hence this second runner.
# Builds kt_kernel/_kt.so with Bazel, stages the package (sources + _kt.so) in a temporary folder on
# PYTHONPATH and runs pytest there. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${KT_SFT_VENV:-$HOME/.cache/kt/sft-venv-$(sha256sum tools/sft_venv_requirements.txt | cut -c1-12)}"
if ! "$venv/bin/python" -c "import torch, transformers, pytest" 2>/dev/null; then
  echo "test_sft_integration.sh: $venv is missing or incomplete; run tools/setup.sh" >&2
  exit 1
fi
# tools:kt is `kt convert`, which the kt_weight_path test uses to make a converted folder (KT_BIN).
bazel build --jobs="$(nproc)" //kt/python:kt_kernel/_kt.so //tools:kt
bin=$(bazel info bazel-bin 2>/dev/null)
export KT_BIN="$bin/tools/kt"
stage=$(mktemp -d /tmp/kt-sft-it.XXXXXX)
trap 'rm -rf "$stage"' EXIT
cp -r kt/python/kt_kernel "$stage/kt_kernel"
cp "$bin/kt/python/kt_kernel/_kt.so" "$stage/kt_kernel/_kt.so"
PYTHONPATH="$stage:kt/python/tests_integration" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  kt/python/tests_integration "$@"
