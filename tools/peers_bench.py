#!/usr/bin/env python3
"""kt beside its peers in one run, one table: `kt bench` (with its PyTorch yardstick and the read-bandwidth and
peak yardsticks it measures in the same process), the original kt-kernel (its AMX build, or its AVX-512 build
where there is no AMX) and llama.cpp's CPU MoE graph (ggml MUL_MAT_ID), on the same layer shape, threads and
token counts, one after the other on this machine.

    tools/peers_bench.py --kt bazel-bin/tools/kt --peers PEERS_DIR --shape 30b --threads 2 \
        --qlens 1,512 --formats bf16,int8

The peers are optional: a peer whose folder is missing, or that refuses this CPU (the original needs AVX-512
BF16/VNNI, its AMX build AMX), is listed with the reason instead of a figure. Definitions are the peers' own
and kt bench's, which agree (the peers folder's README): TFLOPS = 2*3*H*I*qlen*top_k / median time; decode
GB/s = bytes of the distinct experts touched (in each system's own storage format) / median time.

Formats compared: bf16 (kt BF16, the original's BF16, llama.cpp bf16 and f16), int8 (kt int8 per channel with
per-token int8 activations, the original's INT8 (W8A8), llama.cpp q8_0), int4 (kt int4_group_sym group 32,
llama.cpp q4_0: both 4-bit with a scale per 32 weights). Output: the table on stdout (markdown), every raw
line (kt bench's text, the peers' JSON) under --raw DIR if given.

GGUF mode (--gguf TYPES): kt's method LLAMAFILE (tools/gguf_bench.py: a synthetic GGUF layer loaded with
KTMoEWrapper, so --python must have torch and numpy, and kt_kernel with its _kt.so on --kt-pythonpath or
PYTHONPATH; not the gguf package) beside llama.cpp's peer (moe_peer --mode mmid) on the same ggml types
(q8_0, q4_0, q4_K, bf16, f16), shapes (--shapes) and token counts, both timed the same way (new random
routing per call, median), plus the read-bandwidth yardstick of one short `kt bench` run for decode:

    tools/peers_bench.py --gguf q8_0,q4_0,q4_K,bf16,f16 --shapes 30b,235b --qlens 1,512,4096 \
        --kt bazel-bin/tools/kt --peers PEERS_DIR --python python3.12 --kt-pythonpath STAGE --threads 16

--table-from DIR prints the table again from a --raw DIR of such a run (tools/kt_cli_test.sh checks it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

SHAPES = {"30b": "qwen3-30b-a3b", "235b": "qwen3-235b-a22b"}
KT_FORMAT = {"bf16": ("bf16", None), "int8": ("int8", None), "int4": ("int4_group_sym", 32)}
ORIGINAL_METHOD = {"bf16": "BF16", "int8": "INT8"}
LLAMA_TYPES = {"bf16": ["bf16", "f16"], "int8": ["q8_0"], "int4": ["q4_0"]}


def log(msg: str) -> None:
    print(f"peers_bench: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float, env: dict | None = None, cwd: str | None = None) -> tuple[int, str, str]:
    log("$ " + " ".join(cmd))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        return 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timed out"
    return p.returncode, p.stdout, p.stderr


# ---- kt bench's text -> figures ------------------------------------------------------------------------------

_TIME = r"([0-9.]+) (ns|us|µs|ms|s)\b"
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}


def _seconds(value: str, unit: str) -> float:
    return float(value) * _UNIT[unit]


def parse_kt_bench(text: str) -> dict:
    """The figures of one `kt bench` run: CPU, path, yardsticks, decode and prefill latency and rates, torch."""
    out: dict = {}
    if m := re.search(r"^\s*CPU\s+(.+)$", text, re.M):
        out["cpu"] = m.group(1).strip()
    if m := re.search(r"^\s*path\s+(\S+)", text, re.M):
        out["path"] = m.group(1)
    if m := re.search(r"read bandwidth\s+([0-9.]+) GB/s", text):
        out["bandwidth_gbs"] = float(m.group(1))
    dec = text.split("\nDecode", 1)[1] if "\nDecode" in text else ""
    dec = dec.split("\nPrefill", 1)[0]
    if m := re.search(r"median " + _TIME, dec):
        out["decode_s"] = _seconds(m.group(1), m.group(2))
    if m := re.search(r"-> ([0-9.]+) GB/s = ([0-9]+)% of the\s+measured read bandwidth ([0-9.]+) GB/s", dec):
        out["decode_gbs"], out["decode_bw_pct"], out["decode_bw_gbs"] = float(m.group(1)), int(m.group(2)), float(
            m.group(3))
    pre = text.split("\nPrefill", 1)[1] if "\nPrefill" in text else ""
    if m := re.search(r"median " + _TIME, pre):
        out["prefill_s"] = _seconds(m.group(1), m.group(2))
    if m := re.search(r"compute\s+([0-9.]+) (\w+) = ([0-9]+)% of the measured (\S+) peak ([0-9.]+)", pre):
        out["prefill_rate"], out["rate_unit"] = float(m.group(1)), m.group(2)
        out["prefill_peak_pct"], out["peak"] = int(m.group(3)), float(m.group(5))
    for kind in ("decode", "prefill"):
        if m := re.search(kind + r"\s+qlen (\d+)\s+kt " + _TIME + r"(?: \([^)]*\))? vs torch " + _TIME, text):
            out[f"torch_{kind}_s"] = _seconds(m.group(4), m.group(5))
    return out


def kt_runs(args, fmt: str, prefill_qlens: list[int], decode: bool) -> list[dict]:
    """kt bench once per prefill qlen (decode from the first run); [] with a reason when it cannot run."""
    name, group = KT_FORMAT[fmt]
    results = []
    for i, q in enumerate(prefill_qlens or [0]):
        cmd = [args.kt, "bench", f"--shape={SHAPES[args.shape]}", f"--threads={args.threads}", f"--format={name}",
               f"--qlen-prefill={max(q, 1)}", f"--prefill-iters={args.prefill_iters}",
               f"--iters={args.decode_iters if (decode and i == 0) else 3}"]
        if group:
            cmd.append(f"--group-size={group}")
        if args.no_torch:
            cmd.append("--no-torch")
        if args.python:
            cmd.append(f"--python={args.python}")
        rc, so, se = run(cmd, args.timeout)
        save_raw(args, f"kt-{fmt}-{q}.txt", so + "\n--- stderr\n" + se)
        if rc != 0:
            results.append({"error": f"kt bench exit {rc}: {se.strip().splitlines()[-1] if se.strip() else ''}"})
            continue
        r = parse_kt_bench(so)
        r["prefill_qlen"] = q
        r["with_decode"] = decode and i == 0
        results.append(r)
    return results


# ---- peers ------------------------------------------------------------------------------------------------------

def json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def original_rows(args, fmts: list[str], qlens: list[int]) -> tuple[list[dict], str]:
    """The original's AMX build on an AMX CPU, else (or when the AMX build fails) its AVX-512 build."""
    folder = os.path.join(args.peers, "kt-kernel-original")
    if not os.path.isdir(folder):
        return [], f"not present ({folder})"
    methods = [ORIGINAL_METHOD[f] for f in fmts if f in ORIGINAL_METHOD]
    if not methods:
        return [], "no format it has"
    env = dict(os.environ)
    if args.original_python:
        env["PYTHON"] = args.original_python
    base = ["./run.sh", "--shape", args.shape, "--method", ",".join(methods), "--threads", str(args.threads),
            "--qlens", ",".join(map(str, qlens)), "--prefill-iters", str(args.prefill_iters),
            "--decode-iters", str(args.decode_iters)]
    builds = [("AVX-512 build", ["--ext-dir", "noamx_variant", "--allow-no-amx"])]
    if "amx_tile" in open("/proc/cpuinfo").read() and not args.original_noamx:
        builds.insert(0, ("AMX build", []))
    notes = []
    for name, extra in builds:
        rc, so, se = run(base[:1] + extra + base[1:], args.timeout, env=env, cwd=folder)
        save_raw(args, f"original-{name.split()[0].lower()}.jsonl", so + "\n--- stderr\n" + se)
        rows = [r for r in json_lines(so) if "median_s" in r]
        if rows:
            notes.append(name + ("" if rc == 0 else f", exit {rc} (partial)"))
            return rows, "; ".join(notes)
        tail = [ln for ln in se.strip().splitlines() if ln.strip()]
        notes.append(f"{name}: exit {rc}" + (f" ({tail[-1][:160]})" if tail else ""))
    return [], "; ".join(notes)


def llama_rows(args, fmts: list[str], qlens: list[int]) -> tuple[list[dict], str]:
    binary = os.path.join(args.peers, "llama.cpp", "bin", "moe_peer")
    if not os.path.exists(binary):
        return [], f"not present ({binary})"
    types = [t for f in fmts for t in LLAMA_TYPES.get(f, [])]
    cmd = [binary, "-t", str(args.threads), "--mode", "mmid", "--types", ",".join(types), "--shapes",
           SHAPES[args.shape], "--tokens", ",".join(map(str, qlens)), "--big-types", ",".join(types),
           "--decode-iters", str(args.decode_iters), "--prefill-iters", str(args.prefill_iters)]
    rc, so, se = run(cmd, args.timeout)
    save_raw(args, "llama.jsonl", so + "\n--- stderr\n" + se)
    rows = [r for r in json_lines(so) if "median_s" in r]
    if rc != 0 and not rows:
        why = f"killed by signal {-rc}" + (" (SIGILL: its static build needs AVX-512)" if rc == -4 else "") \
            if rc < 0 else f"exit {rc}"
        return [], why
    return rows, "MUL_MAT_ID graph" + ("" if rc == 0 else f", exit {rc} (partial)")


def save_raw(args, name: str, text: str) -> None:
    if args.raw:
        os.makedirs(args.raw, exist_ok=True)
        with open(os.path.join(args.raw, name), "w") as f:
            f.write(text)


# ---- the table --------------------------------------------------------------------------------------------------

def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def cell(seconds: float | None, rate: str) -> str:
    return "–" if seconds is None else f"{fmt_time(seconds)} ({rate})"


# ---- GGUF mode: kt LLAMAFILE beside llama.cpp on the same ggml types ------------------------------------------

GGUF_TYPES = ["q8_0", "q4_0", "q4_K", "bf16", "f16"]  # the llama.cpp peer's types, all of which kt's GGUF path runs


def _gguf_key(row: dict) -> tuple:
    return str(row.get("type", "")).lower(), row.get("shape"), row.get("tokens")


def gguf_kt_rows(args, types: list[str], shapes: list[str], qlens: list[int]) -> tuple[list[dict], str]:
    """tools/gguf_bench.py --json once per (shape, type); its JSON lines."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gguf_bench.py")
    env = dict(os.environ)
    if args.kt_pythonpath:
        env["PYTHONPATH"] = args.kt_pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    rows, notes = [], []
    for shape in shapes:
        for t in types:
            cmd = [args.python or sys.executable, script, "--json", f"--types={t}", f"--shape={SHAPES[shape]}",
                   f"--threads={args.threads}", f"--tokens={','.join(map(str, qlens))}",
                   f"--decode-iters={args.decode_iters}", f"--prefill-iters={args.prefill_iters}"]
            rc, so, se = run(cmd, args.timeout, env=env)
            save_raw(args, f"kt-gguf-{shape}-{t}.jsonl", so + "\n--- stderr\n" + se)
            got = [r for r in json_lines(so) if "median_s" in r]
            rows += got
            if rc != 0:
                tail = [ln for ln in se.strip().splitlines() if ln.strip()]
                notes.append(f"{shape} {t}: exit {rc}" + (f" ({tail[-1][:160]})" if tail else ""))
    return rows, "; ".join(notes)


def gguf_llama_rows(args, types: list[str], shapes: list[str], qlens: list[int]) -> tuple[list[dict], str]:
    binary = os.path.join(args.peers, "llama.cpp", "bin", "moe_peer")
    if not os.path.exists(binary):
        return [], f"not present ({binary})"
    cmd = [binary, "-t", str(args.threads), "--mode", "mmid", "--types", ",".join(types), "--shapes",
           ",".join(SHAPES[s] for s in shapes), "--tokens", ",".join(map(str, qlens)), "--big-types", ",".join(types),
           "--decode-iters", str(args.decode_iters), "--prefill-iters", str(args.prefill_iters)]
    rc, so, se = run(cmd, args.timeout * max(1, len(shapes) * len(types)))
    save_raw(args, "llama-gguf.jsonl", so + "\n--- stderr\n" + se)
    rows = [r for r in json_lines(so) if "median_s" in r]
    if rc != 0 and not rows:
        why = f"killed by signal {-rc}" + (" (SIGILL: this build needs instructions this CPU lacks)" if rc == -4
                                           else "") if rc < 0 else f"exit {rc}"
        return [], why
    return rows, "MUL_MAT_ID graph" + ("" if rc == 0 else f", exit {rc} (partial)")


def gguf_yardstick(args) -> dict:
    """The read bandwidth (and CPU, kt path) from a short `kt bench` run: its yardsticks come first."""
    cmd = [args.kt, "bench", "--shape=qwen3-30b-a3b", f"--threads={args.threads}", "--format=int8", "--layers=1",
           "--iters=1", "--prefill-iters=1", "--qlen-prefill=1", "--no-torch"]
    rc, so, se = run(cmd, args.timeout)
    save_raw(args, "kt-bench-yardstick.txt", so + "\n--- stderr\n" + se)
    out = parse_kt_bench(so)
    if rc != 0 and "bandwidth_gbs" not in out:
        out["error"] = f"kt bench exit {rc}"
    return out


def _ratio(kt: dict | None, peer: dict | None) -> str:
    if not kt or not peer:
        return "–"
    return f"{peer['median_s'] / kt['median_s']:.2f}x"


def gguf_table(types: list[str], shapes: list[str], qlens: list[int], kt: list[dict], llama: list[dict],
               yard: dict, header: str) -> str:
    """The markdown table; kt's and llama.cpp's rows matched on (type, shape, tokens)."""
    kt_by = {_gguf_key(r): r for r in kt}
    ll_by = {_gguf_key(r): r for r in llama}
    bw = yard.get("bandwidth_gbs")
    lines = [header, "",
             "| type | shape | qlen | kt LLAMAFILE | llama.cpp | kt speed-up (llama.cpp time / kt time) | decode read "
             f"bandwidth yardstick ({f'{bw:.1f} GB/s' if bw else yard.get('error', 'not measured')}) |",
             "|---|---|---|---|---|---|---|"]
    for shape in shapes:
        for t in types:
            for q in qlens:
                key = (t.lower(), SHAPES[shape], q)
                k, m = kt_by.get(key), ll_by.get(key)
                unit, rk = ("GB/s", "weight_gb_s") if q == 1 else ("TFLOPS", "tflops")
                kc = cell(k["median_s"], f"{k[rk]:.3g} {unit}") if k else "–"
                mc = (cell(m["median_s"], f"{m[rk]:.3g} {unit}") + (f", {m['buffer']}" if m.get("buffer") else "")
                      if m else "–")
                yc = "–"
                if q == 1 and bw:
                    pairs = (("kt", k), ("llama.cpp", m))
                    yc = "; ".join(f"{name} {100 * r['weight_gb_s'] / bw:.0f}%" for name, r in pairs if r)
                lines.append(f"| {t} | {SHAPES[shape]} | {q} | {kc} | {mc} | {_ratio(k, m)} | {yc} |")
    return "\n".join(lines)


def gguf_main(ap, args) -> int:
    types = [t for t in args.gguf.split(",") if t]
    canon = {t.lower(): t for t in GGUF_TYPES}
    if bad := [t for t in types if t.lower() not in canon]:
        ap.error(f"--gguf: {bad} not in {GGUF_TYPES}")
    types = [canon[t.lower()] for t in types]
    shapes = [s for s in args.shapes.split(",") if s]
    if bad := [s for s in shapes if s not in SHAPES]:
        ap.error(f"--shapes: {bad} not in {sorted(SHAPES)}")
    try:
        qlens = sorted({int(q) for q in args.qlens.split(",") if q})
    except ValueError:
        ap.error(f"--qlens: expected comma-separated integers, got {args.qlens!r}")
    if not qlens or qlens[0] < 1:
        ap.error(f"--qlens: expected token counts >= 1, got {args.qlens!r}")
    if args.table_from:
        def read(name):
            path = os.path.join(args.table_from, name)
            return open(path).read() if os.path.exists(path) else ""
        kt = [r for s in shapes for t in types for r in json_lines(read(f"kt-gguf-{s}-{t}.jsonl"))
              if "median_s" in r]
        llama = [r for r in json_lines(read("llama-gguf.jsonl")) if "median_s" in r]
        yard = parse_kt_bench(read("kt-bench-yardstick.txt"))
        print(gguf_table(types, shapes, qlens, kt, llama, yard, f"## GGUF: kt LLAMAFILE vs llama.cpp, from "
                         f"{args.table_from}: {yard.get('cpu', '?')}, kt path {yard.get('path', '?')}"))
        return 0
    if shutil.which(args.kt) is None and not os.path.exists(args.kt):
        ap.error(f"--kt: no kt binary at {args.kt!r} (build //tools:kt, pass bazel-bin/tools/kt)")
    started = time.time()
    yard = gguf_yardstick(args)
    kt, kt_note = gguf_kt_rows(args, types, shapes, qlens)
    skip = set(args.skip.split(",")) - {""}
    if not args.peers or "llama" in skip:
        llama, llama_note = [], "skipped" if args.peers else "not given: --peers or KT_PEERS names their folder"
    else:
        llama, llama_note = gguf_llama_rows(args, types, shapes, qlens)
    path = next((r.get("path") for r in kt if r.get("path")), yard.get("path", "?"))
    header = (f"## GGUF: kt LLAMAFILE vs llama.cpp, {args.threads} threads: {yard.get('cpu', '?')}, kt path {path}\n\n"
              f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} by tools/peers_bench.py --gguf, "
              f"one run: kt bench's read-bandwidth yardstick, kt LLAMAFILE (tools/gguf_bench.py"
              f"{': ' + kt_note if kt_note else ''}), then llama.cpp ({llama_note}). Same synthetic blocks kind (random "
              "bytes, finite fp16 factors), new random routing per call, median of --decode-iters (decode) or "
              "--prefill-iters (prefill) calls. Decode: median latency (GB/s of the type's own bytes of the distinct "
              "experts touched); prefill: median latency (TFLOPS = 2*3*H*I*qlen*8 / time).")
    print(gguf_table(types, shapes, qlens, kt, llama, yard, header))
    print()
    print(f"Wall time of the run: {time.time() - started:.0f} s.")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kt", default=os.environ.get("KT_BIN", "kt"), help="the kt binary (bazel-bin/tools/kt)")
    ap.add_argument("--peers", default=os.environ.get("KT_PEERS", ""),
                    help="folder holding the peers' kt-kernel-original/ and llama.cpp/ (default $KT_PEERS; none: "
                    "only kt runs, and the table says the peers were not given)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="30b")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--qlens", default="1,512,4096", help="token counts: 1 is decode, the others prefill")
    ap.add_argument("--formats", default="bf16,int8,int4", help="comma list of bf16, int8, int4")
    ap.add_argument("--decode-iters", type=int, default=50)
    ap.add_argument("--prefill-iters", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per command")
    ap.add_argument("--no-torch", action="store_true", help="skip kt bench's PyTorch yardstick")
    ap.add_argument("--python", default="", help="interpreter for kt bench's PyTorch yardstick")
    ap.add_argument("--original-python", default="", help="Python 3.12 with numpy for the original (PYTHON)")
    ap.add_argument("--original-noamx", action="store_true", help="run the original's AVX-512 build on AMX too")
    ap.add_argument("--skip", default="", help="comma list of peers to skip: original, llama")
    ap.add_argument("--raw", default="", help="folder for every raw output")
    ap.add_argument("--gguf", default="", help="GGUF mode: comma list of ggml types (q8_0, q4_0, q4_K, bf16, f16)")
    ap.add_argument("--shapes", default="30b,235b", help="GGUF mode: comma list of shapes")
    ap.add_argument("--kt-pythonpath", default="", help="GGUF mode: folder holding kt_kernel (with _kt.so)")
    ap.add_argument("--table-from", default="", help="GGUF mode: print the table from a --raw folder of a run")
    ap.add_argument("--parse", default="", help="only print the figures parsed from this saved kt bench output "
                    "(JSON; tools/kt_cli_test.sh checks the parser against the binary's real output)")
    args = ap.parse_args()
    if args.parse:
        with open(args.parse) as f:
            print(json.dumps(parse_kt_bench(f.read()), sort_keys=True))
        return 0
    if args.gguf:
        return gguf_main(ap, args)
    if shutil.which(args.kt) is None and not os.path.exists(args.kt):
        ap.error(f"--kt: no kt binary at {args.kt!r} (build //tools:kt, pass bazel-bin/tools/kt)")
    try:
        qlens = sorted({int(q) for q in args.qlens.split(",") if q})
    except ValueError:
        ap.error(f"--qlens: expected comma-separated integers, got {args.qlens!r}")
    if not qlens or qlens[0] < 1:
        ap.error(f"--qlens: expected token counts >= 1, got {args.qlens!r}")
    fmts = [f for f in args.formats.split(",") if f]
    if bad := [f for f in fmts if f not in KT_FORMAT]:
        ap.error(f"--formats: {bad} not in {sorted(KT_FORMAT)}")
    if args.python and os.sep not in args.python:
        args.python = shutil.which(args.python) or args.python  # kt bench runs it by path
    skip = set(args.skip.split(",")) - {""}
    if not args.peers:
        skip |= {"original", "llama"}
    started = time.time()
    prefill = [q for q in qlens if q > 1]
    kt = {f: kt_runs(args, f, prefill, decode=1 in qlens) for f in fmts}
    why_not = "skipped" if args.peers else "not given: --peers or KT_PEERS names their folder"
    orig, orig_note = ([], why_not) if "original" in skip else original_rows(args, fmts, qlens)
    llama, llama_note = ([], why_not) if "llama" in skip else llama_rows(args, fmts, qlens)

    first = next((r for rs in kt.values() for r in rs if "cpu" in r), {})
    print(f"## {SHAPES[args.shape]}, {args.threads} threads: {first.get('cpu', '?')}, kt path {first.get('path', '?')}")
    print()
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} by tools/peers_bench.py, one run: "
          f"kt bench, then the original kt-kernel ({orig_note}), then llama.cpp ({llama_note}). "
          "Decode: median latency (GB/s of the format's own bytes); prefill: median latency (TFLOPS).")
    print()
    print("| format | qlen | kt | kt yardstick | PyTorch eager | original kt-kernel | llama.cpp |")
    print("|---|---|---|---|---|---|---|")
    for f in fmts:
        for q in qlens:
            if q == 1:
                r = next((r for r in kt[f] if r.get("with_decode")), {})
                ktc = cell(r.get("decode_s"), f"{r.get('decode_gbs', 0):.1f} GB/s")
                yard = (f"{r['decode_bw_pct']}% of read bw {r['decode_bw_gbs']:.1f} GB/s"
                        if "decode_bw_pct" in r else r.get("error", "–"))
                torch_s = r.get("torch_decode_s")
            else:
                r = next((r for r in kt[f] if r.get("prefill_qlen") == q), {})
                ktc = cell(r.get("prefill_s"), f"{r.get('prefill_rate', 0):.3f} {r.get('rate_unit', '')}")
                yard = (f"{r['prefill_peak_pct']}% of {r.get('path', '')} peak {r['peak']:.2f}"
                        if "prefill_peak_pct" in r else r.get("error", "–"))
                torch_s = r.get("torch_prefill_s")
            rate_key = "weight_gb_s" if q == 1 else "tflops"
            unit = "GB/s" if q == 1 else "TFLOPS"
            o = [x for x in orig if x.get("method") == ORIGINAL_METHOD.get(f) and x.get("qlen") == q]
            oc = cell(o[0]["median_s"], f"{o[0][rate_key]:.3g} {unit}") if o else "–"
            lc = []
            for t in LLAMA_TYPES.get(f, []):
                m = [x for x in llama if x.get("type") == t and x.get("tokens") == q]
                if m:
                    lc.append(f"{t}: " + cell(m[0]["median_s"], f"{m[0][rate_key]:.3g} {unit}"))
            print(f"| {f} | {q} | {ktc} | {yard} | {fmt_time(torch_s)} | {oc} | {'; '.join(lc) or '–'} |")
    print()
    print(f"Wall time of the run: {time.time() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
