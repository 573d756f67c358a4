#!/usr/bin/env bash
# On the AMX host: compares two packs (tools/amx_host/pack.sh outputs, e.g. one built before a refactor and
# one after) on the paths this CPU has: output checksums of every method (tools/output_checksums.py, each
# pack's Python package) and `kt bench` speed, run alternately A B A B so drift shows as spread.
#   tools/amx_host/compare_packs.sh .device-before .device [ISA,...] [kt bench flags]
# KT_COMPARE_NO_BENCH=1 compares the checksums only.
set -uo pipefail
cd "$(dirname "$0")/../.."
before=$1 after=$2 isas=${3:-}
isa_flag=()
[ -n "$isas" ] && isa_flag=(--isa "$isas")
echo "== checksums: $before vs $after ${isas:+($isas)}"
LD_LIBRARY_PATH="$PWD/$before/lib" PYTHONPATH="$before/python" python3 tools/output_checksums.py "${isa_flag[@]}" --out /tmp/checksums_before.txt \
  | tail -n 1
LD_LIBRARY_PATH="$PWD/$after/lib" PYTHONPATH="$after/python" python3 tools/output_checksums.py "${isa_flag[@]}" --compare /tmp/checksums_before.txt \
  > /tmp/checksums_compare.txt
# Lines only the second pack has (a format the first did not know) are counted; any other difference is printed.
grep -v '^new: ' /tmp/checksums_compare.txt
echo "($(grep -c '^new: ' /tmp/checksums_compare.txt) lines new in $after: $(grep '^new: ' /tmp/checksums_compare.txt \
  | awk '{print $3}' | sort -u | tr '\n' ' '))"
[ -n "${KT_COMPARE_NO_BENCH:-}" ] && exit 0  # checksums only
echo "== kt bench (default model), alternating"
for round in 1 2; do
  for pack in "$before" "$after"; do
    echo "-- $pack (round $round)"
    LD_LIBRARY_PATH="$PWD/$pack/lib" "$pack/bin/kt" bench --no_torch "${@:4}" 2>&1 \
      | tail -n 30
  done
done
