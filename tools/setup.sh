#!/usr/bin/env bash
# Installs every Debian 12 package kt needs to build, test and benchmark, and the virtualenv of
# kt/python/tests_integration (PyPI torch, transformers, PEFT; see below). Idempotent (does nothing when all are
# present), quiet (apt's and pip's output go to a log shown only on failure), loud on failure (non-zero exit).
# Run as root, or as a user with sudo.
set -euo pipefail

PACKAGES=(
  # Build: Debian's Bazel 4.2.3 and the repositories it asks for, offline.
  bazel-bootstrap bazel-platforms bazel-skylib bazel-rules-java
  g++ clang
  # libFuzzer for clang 14 (libclang_rt.fuzzer-x86_64.a): tools/fuzz.sh, run by tools/test.sh.
  clang-14 libclang-rt-14-dev
  # Libraries the C++ build links (wired in third_party/system.BUILD).
  libabsl-dev libhwy-dev libeigen3-dev libgtest-dev libgmock-dev libbenchmark-dev libnuma-dev
  # Python extension and its tests (Debian's /usr/bin/python3 3.11).
  pybind11-dev python3-dev python3-numpy python3-pytest python3-torch python3-pip
  # The virtualenv of kt/python/tests_integration (below).
  python3-venv
)

SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "setup.sh: run as root (or install sudo)" >&2; exit 1; }
  SUDO="sudo"
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  log=$(mktemp /tmp/kt-setup.XXXXXX.log)
  echo "setup.sh: installing ${#missing[@]} Debian packages (log: $log)"
  export DEBIAN_FRONTEND=noninteractive
  if ! { $SUDO apt-get update -qq && \
         $SUDO apt-get install -y -qq "${missing[@]}"; } >"$log" 2>&1; then
    echo "setup.sh: apt-get failed installing: ${missing[*]}" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
fi

# Fail now, with a clear message, rather than halfway through a build.
command -v bazel >/dev/null || { echo "setup.sh: bazel not found after install" >&2; exit 1; }
/usr/bin/python3 -c "import numpy, torch, pytest" 2>/dev/null || {
  echo "setup.sh: /usr/bin/python3 cannot import numpy, torch and pytest" >&2
  exit 1
}
bazel_version=$(dpkg-query -W -f='${Version}' bazel-bootstrap)
torch_version=$(/usr/bin/python3 -c 'import torch; print(torch.__version__)')

# The virtualenv for the tests of kt_kernel.sft with PyPI torch, transformers and PEFT
# (tools/test_sft_integration.sh): the pinned list of tools/sft_venv_requirements.txt, installed with
# --no-deps. It lives outside the clone, named by the list's hash, so that a fresh clone (CI) reuses it
# instead of downloading 4 GB again; KT_SFT_VENV overrides the folder. Built in a temporary folder and
# renamed when complete, so an interrupted setup leaves nothing half-made.
cd "$(dirname "$0")/.."
reqs=tools/sft_venv_requirements.txt
venv="${KT_SFT_VENV:-$HOME/.cache/kt/sft-venv-$(sha256sum "$reqs" | cut -c1-12)}"
check="import torch, transformers, peft, safetensors, numpy, pytest, gguf, compressed_tensors"
if ! "$venv/bin/python" -c "$check" 2>/dev/null; then
  log=$(mktemp /tmp/kt-setup-venv.XXXXXX.log)
  echo "setup.sh: installing $venv from $reqs (PyPI, about 4 GB; log: $log)"
  tmp="$venv.tmp.$$"
  mkdir -p "$(dirname "$venv")"
  if ! { rm -rf "$tmp" && /usr/bin/python3 -m venv "$tmp" && \
         "$tmp/bin/python" -m pip install -q --no-deps --no-input -r "$reqs" && \
         "$tmp/bin/python" -c "$check"; } >"$log" 2>&1; then
    rm -rf "$tmp"
    echo "setup.sh: creating $venv failed (pip install --no-deps -r $reqs from PyPI)" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
  rm -rf "$venv"
  mv "$tmp" "$venv"
fi
venv_versions=$("$venv/bin/python" -c 'import torch, transformers, peft
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")')
echo "setup.sh: ok (bazel-bootstrap $bazel_version, /usr/bin/python3 with torch $torch_version;" \
  "$venv with $venv_versions)"
