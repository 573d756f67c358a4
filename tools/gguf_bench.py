#!/usr/bin/env python3
"""Method LLAMAFILE on a synthetic GGUF layer: decode and prefill time of one MoE layer and the rate at which
it reads the experts' own bytes (docs/FORMATS.md, kt-gguf-rows-v1).

Writes one layer's expert tensors (blk.0.ffn_{gate,up,down}_exps.weight) of the --shape model in the given
ggml types to a temporary .gguf file (random blocks, their fp16 factors kept finite, as llama.cpp's peer
harness makes its q8_0/q4_0/q4_K weights; written here from the GGUF layout, so neither the gguf package nor
llama.cpp is needed: numpy and torch only), loads it with KTMoEWrapper(method="LLAMAFILE") and times forward
for each --tokens count, the way the llama.cpp peer (peers/llama.cpp, moe_peer) times its graph:
- new uniform random top-k routing for every call; warm-up calls untimed, then the median;
- 1 token is decode (--decode-iters calls, 5 warm-up), more is prefill (--prefill-iters calls, 1 warm-up);
- weight GB/s = distinct experts the call touched x one expert's gate, up and down bytes in the file / time;
  TFLOPS = 2 * 3 * H * I * tokens * top_k / time (the peer's definitions).

    PYTHONPATH=<kt_kernel's folder> python3 tools/gguf_bench.py --types Q4_K,Q4_K,Q6_K [--shape qwen3-30b-a3b]
        [--threads N] [--tokens 1,512] [--json]

--types is one type for all three projections (q8_0, q4_0, q4_K, bf16, f16: llama.cpp's spelling is
accepted) or three (gate, up, down). --json prints one JSON object per measurement (the peer's field names:
type, shape, tokens, threads, median_s, weight_gb_s, tflops, experts_touched); tools/peers_bench.py --gguf
runs this beside llama.cpp's peer and tabulates both.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import tempfile
import time

import numpy as np
import torch

SHAPES = {  # name: (experts, top-k, hidden, intermediate)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "qwen3-235b-a22b": (128, 8, 4096, 1536),
    "deepseek-v3": (256, 8, 7168, 2048),
    "tiny": (16, 4, 256, 256),
}
# ggml type: (id, values per block, bytes per block, offsets of fp16 factors in a block)
TYPES = {
    "Q4_0": (2, 32, 18, (0,)), "Q4_1": (3, 32, 20, (0, 2)), "Q5_0": (6, 32, 22, (0,)), "Q5_1": (7, 32, 24, (0, 2)),
    "Q8_0": (8, 32, 34, (0,)), "Q2_K": (10, 256, 84, (80, 82)), "Q3_K": (11, 256, 110, (108,)),
    "Q4_K": (12, 256, 144, (0, 2)), "Q5_K": (13, 256, 176, (0, 2)), "Q6_K": (14, 256, 210, (208,)),
    "BF16": (30, 1, 2, ()), "F16": (1, 1, 2, ()), "F32": (0, 1, 4, ()),
}


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _tensor_bytes(type_name, rows, k, rng):
    tid, bsize, tsize, halves = TYPES[type_name]
    if type_name in ("BF16", "F16", "F32"):
        w = rng.normal(0, 0.02, size=(rows, k)).astype(np.float32)
        if type_name == "F32":
            return w.tobytes()
        if type_name == "F16":
            return w.astype(np.float16).tobytes()
        return (w.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    raw = rng.integers(0, 256, size=(rows * (k // bsize), tsize), dtype=np.uint8)
    for off in halves:
        raw[:, off:off + 2] = rng.uniform(1e-4, 1e-3, size=raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.tobytes()


def write_layer(path, experts, hidden, inter, types, seed=0):
    """A version-3 GGUF file with the three expert tensors of layer 0 (alignment 32)."""
    rng = np.random.default_rng(seed)
    tensors = []
    for proj, t, n, k in (("gate", types[0], inter, hidden), ("up", types[1], inter, hidden),
                          ("down", types[2], hidden, inter)):
        tensors.append((f"blk.0.ffn_{proj}_exps.weight", t, (k, n, experts), _tensor_bytes(t, experts * n, k, rng)))
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1)
    head += _string("general.architecture") + struct.pack("<I", 8) + _string("qwen3moe")
    offset, infos = 0, b""
    for name, t, dims, data in tensors:
        infos += _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", TYPES[t][0], offset)
        offset += (len(data) + 31) // 32 * 32
    with open(path, "wb") as f:
        f.write(head + infos)
        f.write(b"\0" * ((-f.tell()) % 32))
        for _, _, _, data in tensors:
            f.write(data)
            f.write(b"\0" * ((-len(data)) % 32))
    return [len(data) // experts for _, _, _, data in tensors]


def parse_types(text):
    """Three ggml type names (gate, up, down) from one or three, any case (q4_K, Q4_K, bf16)."""
    by_upper = {t.upper(): t for t in TYPES}
    types = [by_upper.get(t.strip().upper()) for t in text.split(",")]
    if len(types) == 1:
        types *= 3
    if len(types) != 3 or None in types:
        raise ValueError(f"--types: one or three (gate, up, down) of {', '.join(TYPES)}, got {text!r}")
    return types


def _routing(E, K, T, g):
    return torch.argsort(torch.rand(T, E, generator=g), dim=1)[:, :K].contiguous()


def measure(moe, E, K, H, I, T, iters, warmup, per_expert, g):
    """Median of `iters` forward calls of T tokens, each with new random routing, after `warmup` calls."""
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    w = torch.rand(T, K, generator=g)
    secs, touched = [], []
    for i in range(warmup + iters):
        ids = _routing(E, K, T, g)
        t0 = time.perf_counter()
        moe.forward(x, ids, w)
        sec = time.perf_counter() - t0
        if i >= warmup:
            secs.append(sec)
            touched.append(len(torch.unique(ids)))
    med = float(np.median(secs))
    experts = float(np.median(touched))
    return {"median_s": med, "min_s": min(secs), "max_s": max(secs), "runs": iters, "experts_touched": experts,
            "weight_gb_s": experts * per_expert / med / 1e9, "tflops": 2 * 3 * H * I * T * K / med / 1e12}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q4_K,Q4_K,Q6_K", help="ggml type(s): one for all, or gate,up,down")
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tokens", default="1,512", help="token counts per call: 1 is decode, more is prefill")
    ap.add_argument("--decode-iters", type=int, default=50)
    ap.add_argument("--prefill-iters", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="one JSON object per measurement")
    args = ap.parse_args()
    try:
        types = parse_types(args.types)
    except ValueError as e:
        ap.error(str(e))
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t]
    except ValueError:
        ap.error(f"--tokens: expected comma-separated integers, got {args.tokens!r}")
    if not tokens or min(tokens) < 1:
        ap.error(f"--tokens: expected token counts >= 1, got {args.tokens!r}")
    from kt_kernel import KTMoEWrapper
    import kt_kernel

    E, K, H, I = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "layer.gguf")
        per_expert = sum(write_layer(path, E, H, I, types))
        moe = KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=K, hidden_size=H, moe_intermediate_size=I,
                           gpu_experts_mask=None, cpuinfer_threads=args.threads, threadpool_count=1, weight_path=path,
                           chunked_prefill_size=max(tokens), method="LLAMAFILE")
        moe.load_weights()
    g = torch.Generator().manual_seed(0)
    name = types[0] if len(set(types)) == 1 else ",".join(types)
    if not args.json:
        print(f"LLAMAFILE {name} {args.shape} (E={E}, k={K}, H={H}, I={I}), {args.threads} threads, "
              f"path {kt_kernel.__cpu_variant__}")
    for T in tokens:
        iters, warmup = (args.decode_iters, 5) if T == 1 else (args.prefill_iters, 1)
        r = measure(moe, E, K, H, I, T, iters, warmup, per_expert, g)
        if args.json:
            print(json.dumps({"impl": "kt LLAMAFILE", "type": name, "shape": args.shape, "tokens": T,
                              "threads": args.threads, "path": kt_kernel.__cpu_variant__, **r}), flush=True)
        else:
            print(f"{'decode' if T == 1 else 'prefill':8s} {T:5d} tokens: median {r['median_s'] * 1e3:8.3f} ms, "
                  f"{r['experts_touched']:.0f} experts x {per_expert / 2**20:.2f} MiB -> "
                  f"{r['weight_gb_s']:6.2f} GB/s, "
                  f"{r['tflops']:6.3f} TFLOPS", flush=True)


if __name__ == "__main__":
    main()
