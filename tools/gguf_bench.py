#!/usr/bin/env python3
"""Method LLAMAFILE on a synthetic GGUF layer: decode and prefill time of one MoE layer and the rate at which
it reads the experts' own bytes (docs/FORMATS.md, kt-gguf-rows-v1).

Writes one layer's expert tensors (blk.0.ffn_{gate,up,down}_exps.weight) of the --shape model in the given
ggml types to a temporary .gguf file (random blocks, their fp16 factors kept finite; written here from the
GGUF layout, so neither the gguf package nor llama.cpp is needed), loads it with
KTMoEWrapper(method="LLAMAFILE") and times forward:
- decode: --batch tokens (default 1) with random top-k routing; "read" counts the distinct experts the step
  touches, each expert's gate, up and down bytes once;
- prefill: --prefill tokens (default 512), every expert touched (bytes of all experts).

    PYTHONPATH=<kt_kernel's folder> python3 tools/gguf_bench.py --types Q4_K,Q4_K,Q6_K [--shape qwen3-30b-a3b]
        [--threads N] [--batch 1] [--prefill 512]

Compare its GB/s with the machine's read bandwidth (`kt bench` prints it) and with llama.cpp's
`llama-bench`/`test-backend-ops -o MUL_MAT_ID` on the same shapes and types.
"""

from __future__ import annotations

import argparse
import os
import struct
import tempfile
import time

import numpy as np
import torch

SHAPES = {  # name: (experts, top-k, hidden, intermediate)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
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


def _time(fn, min_seconds=1.0):
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q4_K,Q4_K,Q6_K", help="ggml types of gate, up, down")
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefill", type=int, default=512)
    args = ap.parse_args()
    types = args.types.split(",")
    if len(types) != 3 or any(t not in TYPES for t in types):
        ap.error(f"--types: three of {', '.join(TYPES)} (gate, up, down), got {args.types!r}")
    from kt_kernel import KTMoEWrapper
    import kt_kernel

    E, K, H, I = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "layer.gguf")
        per_expert = sum(write_layer(path, E, H, I, types))
        moe = KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=K, hidden_size=H, moe_intermediate_size=I,
                           gpu_experts_mask=None, cpuinfer_threads=args.threads, threadpool_count=1, weight_path=path,
                           chunked_prefill_size=max(args.prefill, args.batch), method="LLAMAFILE")
        moe.load_weights()
    g = torch.Generator().manual_seed(0)
    print(f"LLAMAFILE {','.join(types)} {args.shape} (E={E}, k={K}, H={H}, I={I}), {args.threads} threads, "
          f"path {kt_kernel.__cpu_variant__}")
    for name, T_ in (("decode", args.batch), ("prefill", args.prefill)):
        x = torch.randn(T_, H, generator=g).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T_)])
        w = torch.rand(T_, K, generator=g)
        sec = _time(lambda: moe.forward(x, ids, w))
        read = len(torch.unique(ids)) * per_expert
        print(f"{name:8s} {T_:5d} tokens: {sec * 1e3:8.3f} ms, experts' bytes {read / 2**20:8.1f} MiB -> "
              f"{read / sec / 1e9:6.2f} GB/s, {2 * 3 * T_ * K * H * I / sec / 1e12:6.3f} TOPS")


if __name__ == "__main__":
    main()
