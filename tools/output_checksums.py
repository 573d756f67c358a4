#!/usr/bin/env python3
"""Output checksums of every kt method on every kernel path, for fixed seeds: a refactor that must change
no result records them before and compares after.

For each KT_ISA path this CPU supports (each run in its own process with KT_ISA set, since the path is
chosen at import), every inference method of KTMoEWrapper runs a few batch sizes, and every SFT base
format (with LoRA and SkipLoRA) runs forward + backward; each output tensor's bytes are hashed with
sha256. One line per (path, method, case, tensor):

    avx2 AMXINT8 qlen=7 output 3f1c...

A case that raises prints `error:<exception type>` instead of a hash, so a changed error is a difference
too. The inputs come from numpy's legacy RandomState (its stream is fixed across numpy versions) and are
rounded to bf16 here, so the same seeds give the same bits on any host and torch version.

    python3 tools/output_checksums.py                      # print
    python3 tools/output_checksums.py --out FILE           # record
    python3 tools/output_checksums.py --compare FILE       # exit 1 naming each differing line
    python3 tools/output_checksums.py --isa avx2,scalar    # only these paths (default: all supported)

It needs the kt_kernel package with its built extension: either on PYTHONPATH (on a host without Bazel,
e.g. PYTHONPATH=.device/python python3 tools/output_checksums.py), or from this checkout's kt/python/kt_kernel
with the extension given by --kt-so (copied together into a temporary folder):
    bazel build //kt/python:kt_kernel/_kt.so
    /usr/bin/python3 tools/output_checksums.py --kt-so $(bazel info bazel-bin)/kt/python/kt_kernel/_kt.so
Compare builds of one compilation mode: the recorded files come from .bazelrc's default (fastbuild, -O2).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

ALL_ISAS = ("scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")

INFERENCE_METHODS = (
    "BF16",
    "AMXINT8",
    "MOE_INT8",
    "AMXINT4",
    "MOE_INT4",
    "AMXINT4_1",
    "MOE_INT4_1",
    "AMXINT4_KGroup",
    "MOE_INT4_KGroup",
    "AMXINT4_1KGroup",
    "MOE_INT4_1KGroup",
    "FP8",
)
SFT_BASES = (
    "AMXBF16_SFT",
    "AMXINT8_SFT",
    "AMXINT4_SFT",
    "AMXINT4_1_SFT",
    "AMXINT4_KGroup_SFT",
    "AMXINT4_1KGroup_SFT",
)

# Shapes: H and I multiples of the group size (64) and of several column blocks (48-column tasks: 4 of I),
# qlen up to 256 so that experts get more rows than one 64-row chunk.
E, K, H, I = 8, 3, 256, 192
GROUP = 64
INFER_QLENS = (1, 7, 64, 256)
SFT_QLENS = (1, 37, 130)
RANK, ALPHA = 8, 16.0
THREADS = 3


def bf16_from_f32(a):
    """float32 numpy array -> torch bf16 tensor, rounded to nearest even here (independent of torch)."""
    import numpy as np
    import torch

    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return torch.from_numpy(rounded.view(np.int16).copy()).view(torch.bfloat16)


def digest(t) -> str:
    import torch

    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def experts(seed):
    import numpy as np

    rs = np.random.RandomState(seed)
    gate = bf16_from_f32(rs.standard_normal((E, I, H)).astype(np.float32) / H**0.5)
    up = bf16_from_f32(rs.standard_normal((E, I, H)).astype(np.float32) / H**0.5)
    down = bf16_from_f32(rs.standard_normal((E, H, I)).astype(np.float32) / I**0.5)
    return gate, up, down


def routing(seed, qlen):
    """x, ids (with a skipped slot and an out-of-range id when qlen allows), weights, grad_output."""
    import numpy as np
    import torch

    rs = np.random.RandomState(seed)
    x = bf16_from_f32(rs.standard_normal((qlen, H)).astype(np.float32))
    ids = np.stack([rs.permutation(E)[:K] for _ in range(qlen)]).astype(np.int64)
    if qlen > 2:
        ids[1, 0] = -1
        ids[2, 2] = E
    w = (rs.random_sample((qlen, K)) * 0.9 + 0.1).astype(np.float32)
    gout = bf16_from_f32(rs.standard_normal((qlen, H)).astype(np.float32))
    return x, torch.from_numpy(ids), torch.from_numpy(w), gout


def lora_tensors(seed):
    import numpy as np
    import torch

    rs = np.random.RandomState(seed)
    shapes = [(E, RANK, H), (E, I, RANK), (E, RANK, H), (E, I, RANK), (E, RANK, I), (E, H, RANK)]
    fan_in = [H, RANK, H, RANK, I, RANK]
    weights = [bf16_from_f32(0.5 * rs.standard_normal(s).astype(np.float32) / f**0.5) for s, f in zip(shapes, fan_in)]
    grads = [torch.full(s, 7.0, dtype=torch.bfloat16) for s in shapes]
    return weights, grads


def wrapper(method, max_len, **kw):
    from kt_kernel import KTMoEWrapper

    return KTMoEWrapper(
        layer_idx=0,
        num_experts=E,
        num_experts_per_tok=K,
        hidden_size=H,
        moe_intermediate_size=I,
        gpu_experts_mask=None,
        cpuinfer_threads=THREADS,
        threadpool_count=1,
        weight_path=None,
        chunked_prefill_size=max_len,
        method=method,
        **kw,
    )


def inference_lines(isa):
    import torch

    gate, up, down = experts(11)
    for method in INFERENCE_METHODS:
        try:
            moe = wrapper(method, max(INFER_QLENS), group_size=GROUP)
            moe.load_weights_from_tensors(gate, up, down, None)
        except Exception as e:  # noqa: BLE001 - the error is the result
            yield f"{isa} {method} load error:{type(e).__name__}"
            continue
        cases = [(f"qlen={q}", q, None) for q in INFER_QLENS]
        mask = torch.zeros(E, dtype=torch.bool)
        mask[2] = True
        cases.append(("qlen=7,mask=2", 7, mask))
        for name, qlen, m in cases:
            x, ids, w, _ = routing(100 + qlen, qlen)
            try:
                moe.gpu_experts_mask = m
                yield f"{isa} {method} {name} output {digest(moe.forward(x, ids, w))}"
            except Exception as e:  # noqa: BLE001
                yield f"{isa} {method} {name} output error:{type(e).__name__}"


def sft_lines(isa):
    gate, up, down = experts(12)
    for base in SFT_BASES:
        for method in (base, base + "_SkipLoRA"):
            lora = not method.endswith("_SkipLoRA")
            try:
                kw = dict(mode="sft", lora_rank=RANK, lora_alpha=ALPHA, max_cache_depth=1, group_size=GROUP)
                moe = wrapper(method, max(SFT_QLENS), **kw)
                moe.load_weights_from_tensors(gate, up, down, None)
                weights, grads = lora_tensors(13)
                if lora:
                    moe.init_lora_weights(*weights, *grads)
            except Exception as e:  # noqa: BLE001
                yield f"{isa} {method} load error:{type(e).__name__}"
                continue
            for qlen in SFT_QLENS:
                x, ids, w, gout = routing(200 + qlen, qlen)
                case = f"{isa} {method} qlen={qlen}"
                try:
                    out = moe.forward(x, ids, w, save_for_backward=True)
                    gi, gw = moe.backward(gout)
                except Exception as e:  # noqa: BLE001
                    yield f"{case} fwd+bwd error:{type(e).__name__}"
                    continue
                yield f"{case} output {digest(out)}"
                yield f"{case} grad_input {digest(gi)}"
                yield f"{case} grad_weights {digest(gw)}"
                if lora:
                    names = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")
                    for name, g in zip(names, grads):
                        yield f"{case} grad_{name} {digest(g)}"


def child(isa):
    """Runs in a process started with KT_ISA=isa: prints this path's lines."""
    import torch

    torch.set_num_threads(1)
    import kt_kernel

    if kt_kernel.__cpu_variant__ != isa:
        sys.exit(f"KT_ISA={isa} but kt_kernel runs {kt_kernel.__cpu_variant__}")
    for gen in (inference_lines(isa), sft_lines(isa)):
        for line in gen:
            print(line, flush=True)


def supported_isas():
    from kt_kernel import _native

    return [isa for isa in ALL_ISAS if _native._kt.isa_supported(isa)]


def stage_package(kt_so, folder):
    """kt/python/kt_kernel of this checkout plus the extension `kt_so`, in `folder`; returns folder."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kt", "python", "kt_kernel")
    dst = os.path.join(folder, "kt_kernel")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(kt_so, os.path.join(dst, "_kt.so"))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, folder)
    return folder


def run_path(isa):
    env = dict(os.environ, KT_ISA=isa)
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", isa], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"path {isa} failed (exit {r.returncode}):\n{r.stderr}")
    return r.stdout.splitlines()


def compare(lines, path):
    with open(path) as f:
        want = [ln.rstrip("\n") for ln in f if ln.strip() and not ln.startswith("#")]
    key = lambda ln: ln.rsplit(" ", 1)[0]  # noqa: E731 - everything but the hash
    got_map = {key(ln): ln for ln in lines}
    want_map = {key(ln): ln for ln in want}
    # Only the paths run here are compared (a baseline from a host with more paths stays usable).
    paths = {ln.split(" ", 1)[0] for ln in lines}
    bad = []
    for k, ln in want_map.items():
        if k.split(" ", 1)[0] not in paths:
            continue
        if k not in got_map:
            bad.append(f"missing: {ln}")
        elif got_map[k] != ln:
            bad.append(f"differs: {k}: recorded {ln.rsplit(' ', 1)[1]}, now {got_map[k].rsplit(' ', 1)[1]}")
    for k, ln in got_map.items():
        if k not in want_map:
            bad.append(f"new: {ln}")
    return bad


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write the lines to this file")
    p.add_argument("--compare", help="compare with a recorded file; exit 1 naming the differing lines")
    p.add_argument("--isa", help="comma-separated paths (default: every path this CPU supports)")
    p.add_argument("--kt-so", help="the built _kt.so to run with this checkout's kt/python/kt_kernel")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return 0
    if args.kt_so:
        with tempfile.TemporaryDirectory(prefix="kt_checksums_") as folder:
            stage_package(args.kt_so, folder)
            return run(args)
    return run(args)


def run(args):
    isas = args.isa.split(",") if args.isa else supported_isas()
    lines = []
    for isa in isas:
        lines += run_path(isa)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# tools/output_checksums.py: path method case tensor sha256\n")
            f.write("\n".join(lines) + "\n")
    if args.compare:
        bad = compare(lines, args.compare)
        for b in bad:
            print(b)
        print(f"{len(lines)} lines on {','.join(isas)}: {len(bad)} differ from {args.compare}")
        return 1 if bad else 0
    if not args.out:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
