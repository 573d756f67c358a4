#!/bin/bash
# The `kt` command line's contract: help and version exit 0; usage errors exit 2 with the offending flag or
# value named on stderr; the usage text lists the flags from their definitions.
set -u

KT="${TEST_SRCDIR}/${TEST_WORKSPACE}/tools/kt"
VERSION_PY="${TEST_SRCDIR}/${TEST_WORKSPACE}/kt/python/kt_kernel/_version.py"
OUT="${TEST_TMPDIR}/stdout"
ERR="${TEST_TMPDIR}/stderr"
failures=0

fail() {
  echo "FAIL: $*"
  echo "  stdout: $(head -c 2000 "$OUT")"
  echo "  stderr: $(head -c 2000 "$ERR")"
  failures=$((failures + 1))
}

# expect CODE ARGS...: runs kt ARGS and checks the exit code.
expect() {
  local want="$1"
  shift
  "$KT" "$@" >"$OUT" 2>"$ERR"
  local got=$?
  if [[ "$got" != "$want" ]]; then
    fail "kt $* exited $got, expected $want"
    return 1
  fi
}

# contains FILE TEXT: FILE holds TEXT (fixed string).
contains() {
  if ! grep -qF -- "$2" "$1"; then
    fail "$(basename "$1") lacks '$2'"
  fi
}

expect 0 --help && contains "$OUT" "commands:"
expect 0 -h
expect 0 help
expect 2 && contains "$ERR" "missing command"
expect 2 frobnicate && contains "$ERR" "unknown command 'frobnicate'"
expect 2 --bogus && contains "$ERR" "'--bogus'"

# --version: the version (the Python package's) and the kernel path selected at run time.
want_version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$VERSION_PY")"
[[ -n "$want_version" ]] || fail "no __version__ in $VERSION_PY"
expect 0 --version && contains "$OUT" "kt ${want_version}" && contains "$OUT" "kernel path: "
KT_ISA=scalar expect 0 --version && contains "$OUT" "kernel path: scalar (KT_ISA=scalar)"
KT_ISA=nonsense expect 2 --version && contains "$OUT" "nonsense"

# bench --help: every flag, generated from its definition (name, default, help text).
expect 0 bench --help
for flag in --shape=qwen3-30b-a3b --threads=0 --pin --qlen-decode=1 --qlen-prefill=512 --iters=100 \
    --prefill-iters=5 --layers=0 --bandwidth-mib=1024 --seed=1 --format=bf16 --group-size=128 \
    --tiling=0,0,0,0 --sweep-tiling --no-torch --python=/usr/bin/python3 --torch-script --weights --layer=-1 \
    --method; do
  contains "$OUT" "  $flag"
done
contains "$OUT" "tokens per decode call"
contains "$OUT" "(an integer in [1, 4096])"
expect 0 bench -h
expect 0 convert --help && contains "$OUT" "--method" && contains "$OUT" "AMXINT4_KGroup"
expect 0 convert --help && contains "$OUT" "GGUF" && contains "$OUT" "LLAMAFILE, which runs GGUF as stored"
expect 0 doctor --help

# Usage errors name the flag or value, exit 2, and print no benchmark.
expect 2 bench --bogus && contains "$ERR" "bogus"
expect 2 bench --format=nope && contains "$ERR" "--format" && contains "$ERR" "nope"
expect 2 bench --format nope && contains "$ERR" "--format"
expect 2 bench --threads=abc && contains "$ERR" "--threads" && contains "$ERR" "abc"
expect 2 bench --threads 0 && contains "$ERR" "flag --threads wants an integer in [1, 4096], got '0'"
expect 2 bench --qlen-decode && contains "$ERR" "flag --qlen-decode needs a value"
expect 2 bench --shape=qwen2 && contains "$ERR" "--shape" && contains "$ERR" "qwen3-30b-a3b or qwen3-235b-a22b"
expect 2 bench --group-size=96 && contains "$ERR" "--group-size 96: expected 32, 64 or 128"
expect 2 bench --tiling=3 && contains "$ERR" "--tiling" && contains "$ERR" "G,D[,R[,KB]]"
expect 2 bench --tiling="3,8 2,8" && contains "$ERR" "--tiling" && contains "$ERR" "expected one"
expect 2 bench --sweep-tiling="" && contains "$ERR" "--sweep-tiling"
expect 2 bench --pin=maybe && contains "$ERR" "--pin"
expect 2 bench --input=x && contains "$ERR" "unknown flag '--input'"
expect 2 bench extra && contains "$ERR" "unexpected argument 'extra'"
expect 2 bench --layer 1 && contains "$ERR" "flag --layer needs --weights DIR"
expect 2 bench --method AMXINT8 && contains "$ERR" "flag --method needs --weights DIR"
expect 2 bench --weights /x --shape=qwen3-30b-a3b && contains "$ERR" "flag --shape does not apply with --weights"
expect 2 bench --weights /x --format=int8 && contains "$ERR" "flag --format does not apply with --weights"
[[ ! -s "$OUT" ]] || fail "bench printed to stdout on a usage error"
expect 2 doctor --bogus && contains "$ERR" "doctor: unknown flag '--bogus'"
expect 2 convert --input /nonexistent && contains "$ERR" "--input, --output and --method are required"
expect 2 convert --threads=-1 && contains "$ERR" "--threads"
expect 2 convert --shape=qwen3-30b-a3b && contains "$ERR" "unknown flag '--shape'"

# bench --weights: a real layer read from a folder (kt/moe/layer_loader.h), small enough to run here.
HF="${TEST_SRCDIR}/${TEST_WORKSPACE}/testdata/hf"
QUICK=(--threads 1 --iters 3 --prefill-iters 1 --qlen-prefill 16 --bandwidth-mib 16 --no-torch)
expect 0 bench --weights "$HF/qwen3_moe" "${QUICK[@]}" &&
  contains "$OUT" "bf16 routed experts" &&
  contains "$OUT" "shape      Qwen3MoeForCausalLM from $HF/qwen3_moe: E=8 experts, top-k=2, hidden=128" &&
  contains "$OUT" "Weights    $HF/qwen3_moe layer 0 (Hugging Face folder, method BF16)" &&
  contains "$OUT" "PASS" && contains "$OUT" "Decode     qlen 1" && contains "$OUT" "Prefill    qlen 16"
# tools/peers_bench.py reads kt bench's text: every figure it tabulates is found in this real output.
PEERS_BENCH="${TEST_SRCDIR}/${TEST_WORKSPACE}/tools/peers_bench.py"
parsed="$(/usr/bin/python3 "$PEERS_BENCH" --parse "$OUT")" || fail "peers_bench.py --parse failed"
for key in cpu path bandwidth_gbs decode_s decode_gbs decode_bw_pct decode_bw_gbs prefill_s prefill_rate \
    prefill_peak_pct peak; do
  [[ "$parsed" == *"\"$key\": "* ]] || fail "peers_bench.py found no '$key' in kt bench's output: $parsed"
done
# peers_bench.py --gguf tabulates kt's LLAMAFILE lines beside llama.cpp's, matched on (type, shape, tokens),
# with the bandwidth of this real kt bench output as the decode yardstick.
RAW="$(mktemp -d)"
cp "$OUT" "$RAW/kt-bench-yardstick.txt"
bw="$(/usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["bandwidth_gbs"])' <<<"$parsed")"
echo '{"impl": "kt LLAMAFILE", "type": "Q4_0", "shape": "qwen3-30b-a3b", "tokens": 1, "median_s": 0.002,'\
  '"weight_gb_s": 0.1, "tflops": 0.001}' >"$RAW/kt-gguf-30b-q4_0.jsonl"
echo '{"type": "q4_0", "buffer": "cpu_repack", "shape": "qwen3-30b-a3b", "tokens": 1, "median_s": 0.004,'\
  '"weight_gb_s": 0.05, "tflops": 0.0005}' >"$RAW/llama-gguf.jsonl"
table="$(/usr/bin/python3 "$PEERS_BENCH" --gguf q4_0 --shapes 30b --qlens 1,512 --table-from "$RAW")" ||
  fail "peers_bench.py --gguf --table-from failed"
want_pct="$(/usr/bin/python3 -c "print(f'kt {100 * 0.1 / $bw:.0f}%; llama.cpp {100 * 0.05 / $bw:.0f}%')")"
for want in "| q4_0 | qwen3-30b-a3b | 1 | 2.00 ms (0.1 GB/s) | 4.00 ms (0.05 GB/s), cpu_repack | 2.00x | $want_pct |" \
    "| q4_0 | qwen3-30b-a3b | 512 | – | – | – | – |" "bandwidth yardstick ($(printf %.1f "$bw") GB/s)"; do
  [[ "$table" == *"$want"* ]] || fail "peers_bench.py --gguf table lacks '$want': $table"
done
/usr/bin/python3 "$PEERS_BENCH" --gguf q3_K --table-from "$RAW" >/dev/null 2>"$RAW/err" &&
  fail "peers_bench.py --gguf q3_K succeeded"
grep -q -- "--gguf: \['q3_K'\] not in" "$RAW/err" || fail "peers_bench.py --gguf q3_K: $(cat "$RAW/err")"
rm -rf "$RAW"
expect 0 bench --weights "$HF/mixtral" --method MOE_INT4 "${QUICK[@]}" &&
  contains "$OUT" "int4 routed experts" && contains "$OUT" "method     MOE_INT4" &&
  contains "$OUT" "int4 format vs the bf16 model"
expect 1 bench --weights "$HF/qwen3_moe" --layer 3 "${QUICK[@]}" && contains "$ERR" "layer 3 is not a MoE layer"
expect 1 bench --weights "$HF/qwen3_moe" --method INT3 "${QUICK[@]}" && contains "$ERR" "unknown method \"INT3\""
expect 1 bench --weights /nonexistent "${QUICK[@]}" && contains "$ERR" "/nonexistent/config.json"

# doctor still runs.
expect 0 doctor && contains "$OUT" "kernel paths"

if ((failures > 0)); then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all checks passed"
