#!/usr/bin/env bash
# Builds kt/io's libFuzzer targets with Debian's clang 14 (-fsanitize=fuzzer,address,undefined) and runs each
# for KT_FUZZ_SECONDS (default 60) from the seed corpus in kt/io/testdata/fuzz/<target>/. Fails (exit 1) on
# any finding: a sanitizer report, a crash, a timeout (> 10 s on one input) or a leak; the reproducer is left
# in $KT_FUZZ_OUT/<target>/ (printed). The committed seeds are never modified: libFuzzer grows a copy.
#
#   tools/fuzz.sh                       # all targets, 60 s each
#   KT_FUZZ_SECONDS=10 tools/fuzz.sh gguf
#
# Needs clang-14 and libclang-rt-14-dev (libFuzzer), installed by tools/setup.sh; Abseil from libabsl-dev.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${KT_FUZZ_SECONDS:-60}"
out="${KT_FUZZ_OUT:-/tmp/kt_fuzz}"
cxx="${KT_FUZZ_CXX:-clang++-14}"
command -v "$cxx" >/dev/null || { echo "fuzz.sh: $cxx not found (tools/setup.sh installs clang-14)" >&2; exit 1; }

ABSL_LIBS=(-labsl_statusor -labsl_status -labsl_cord -labsl_cordz_info -labsl_cord_internal
  -labsl_cordz_functions -labsl_cordz_handle -labsl_str_format_internal -labsl_strings -labsl_strings_internal
  -labsl_synchronization -labsl_graphcycles_internal -labsl_stacktrace -labsl_symbolize -labsl_time
  -labsl_time_zone -labsl_int128 -labsl_throw_delegate -labsl_raw_logging_internal -labsl_spinlock_wait
  -labsl_base -labsl_malloc_internal -labsl_log_severity)
FLAGS=(-std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
  -fno-omit-frame-pointer -I.)

declare -A SOURCES=(
  [safetensors]="kt/io/safetensors_fuzz.cc kt/io/safetensors.cc kt/io/file_util.cc kt/io/json.cc"
  [gguf]="kt/io/gguf_fuzz.cc kt/io/gguf.cc kt/io/gguf_value.cc kt/io/gguf_writer.cc kt/io/file_util.cc kt/io/json.cc"
  [arch]="kt/io/arch_fuzz.cc kt/io/arch.cc kt/io/arch_names.cc kt/io/json.cc"
)
# Largest input per target: headers and configs are small; larger inputs only slow the search.
declare -A MAX_LEN=([safetensors]=4096 [gguf]=4096 [arch]=8192)

targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(safetensors gguf arch)

mkdir -p "$out"
status=0
for t in "${targets[@]}"; do
  [ -n "${SOURCES[$t]:-}" ] || { echo "fuzz.sh: unknown target '$t' (safetensors, gguf, arch)" >&2; exit 2; }
  bin="$out/${t}_fuzz"
  # shellcheck disable=SC2086
  "$cxx" "${FLAGS[@]}" ${SOURCES[$t]} "${ABSL_LIBS[@]}" -o "$bin"
  work="$out/$t"
  rm -rf "$work" && mkdir -p "$work/corpus" "$work/artifacts"
  cp kt/io/testdata/fuzz/"$t"/* "$work/corpus/"
  echo "fuzz.sh: $t for ${seconds}s (seeds: $(ls kt/io/testdata/fuzz/"$t" | wc -l))"
  # -timeout: one input taking > 10 s is a finding (these parsers are linear); -rss_limit_mb bounds memory.
  if ! "$bin" -max_total_time="$seconds" -max_len="${MAX_LEN[$t]}" -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$work/artifacts/" "$work/corpus" >"$work/log.txt" 2>&1; then
    echo "fuzz.sh: $t FAILED; log $work/log.txt, reproducer(s):" >&2
    ls "$work/artifacts" >&2 || true
    tail -n 40 "$work/log.txt" >&2
    status=1
  else
    echo "fuzz.sh: $t ok ($(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$work/log.txt" | grep -o '[0-9]*$') runs)"
  fi
done
exit "$status"
