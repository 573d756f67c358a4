#!/usr/bin/env python3
"""Times KTMoEWrapper.load_weights(weight_path) of one MoE layer from the page cache.

    bazel run -c opt //tools:weight_load_bench -- --path /tmp/synth235b_int8 --method AMXINT8 --threads 2

The folder's files are read once first (so they sit in the page cache), then the layer is loaded --repeat
times; the best run is reported as GB/s of expert bytes read from the folder (file_bytes / wall time, the
checksum pass included), beside the split kt measures (verify_seconds, load_seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from kt_kernel import KTMoEWrapper


def warm(path: str) -> None:
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as f:
                while f.read(64 << 20):
                    pass


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", required=True)
    ap.add_argument("--method", default="BF16")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with open(os.path.join(a.path, "config.json")) as f:
        c = json.load(f)
    c = c.get("text_config", c)
    E = c.get("num_experts", c.get("num_local_experts", c.get("n_routed_experts")))
    moe = KTMoEWrapper(layer_idx=a.layer, num_experts=E, num_experts_per_tok=c["num_experts_per_tok"],
                       hidden_size=c["hidden_size"], moe_intermediate_size=c["moe_intermediate_size"],
                       gpu_experts_mask=None, cpuinfer_threads=a.threads, threadpool_count=1,
                       weight_path=a.path, chunked_prefill_size=1, method=a.method)
    warm(a.path)
    best = None
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        moe.load_weights(None)
        dt = time.perf_counter() - t0
        s = moe.last_load_stats
        if best is None or dt < best[0]:
            best = (dt, s)
    dt, s = best
    print(f"{a.path} {a.method} threads={a.threads} isa={moe.isa} converted={s['converted']}: "
          f"{s['file_bytes'] / 1e9:.2f} GB in {dt:.2f} s = {s['file_bytes'] / 1e9 / dt:.2f} GB/s "
          f"(verify {s['verify_seconds']:.2f} s, read+pack {s['load_seconds']:.2f} s), "
          f"packed {moe._moe.weight_bytes / 1e9:.2f} GB, process RSS after load {rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
