#!/usr/bin/env bash
# Installs every Debian 12 package kt needs to build, test and benchmark. Idempotent (does nothing when all
# are present), quiet (apt's output goes to a log shown only on failure), loud on failure (non-zero exit).
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
echo "setup.sh: ok (bazel-bootstrap $bazel_version, /usr/bin/python3 with torch $torch_version)"
