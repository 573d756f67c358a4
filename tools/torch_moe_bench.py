#!/usr/bin/env python3
"""PyTorch yardstick for `kt bench`: the bf16 eager loop over experts of one MoE layer.

For every activated expert: index its tokens, h = silu(x @ Wg.T) * (x @ Wu.T), y = h @ Wd.T, and add
y * routing weight into the output with index_add_ (the usual Hugging Face style loop). Weights are random
(this measures time, not accuracy). Prints one JSON line per qlen:
  {"qlen": 1, "seconds_per_iter": ..., "tflops": ..., ...}
"""
import argparse
import json
import statistics
import sys
import time


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--qlen", type=int, nargs="+", default=[1, 512], help="one or more token counts")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--iters", type=int, nargs="+", default=[20, 2],
                   help="timed iterations per qlen (one value for all, or one per qlen)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop timing a qlen after this many seconds (at least one iteration is timed)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if len(args.iters) not in (1, len(args.qlen)):
        p.error("--iters takes one value or one per --qlen")
    iters = args.iters * len(args.qlen) if len(args.iters) == 1 else args.iters

    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        print(json.dumps({"error": "torch not available: %s" % e}))
        return 3

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    E, K, H, I = args.experts, args.topk, args.hidden, args.inter
    t0 = time.perf_counter()
    # Uniform with std 1/sqrt(fan_in), generated in fp32 chunks to bound the peak memory.
    def weights(rows, cols):
        w = torch.empty(E, rows, cols, dtype=torch.bfloat16)
        bound = (3.0 / cols) ** 0.5
        for e in range(E):
            w[e].copy_(torch.empty(rows, cols).uniform_(-bound, bound))
        return w
    wg, wu, wd = weights(I, H), weights(I, H), weights(H, I)
    setup_s = time.perf_counter() - t0

    def moe(x, ids, w):
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.where(ids == e)
            xe = x[tok]
            h = F.silu(xe @ wg[e].T) * (xe @ wu[e].T)
            y = h @ wd[e].T
            out.index_add_(0, tok, y * w[tok, slot, None].to(y.dtype))
        return out

    def routing(qlen):
        ids = torch.rand(qlen, E).argsort(dim=1)[:, :K]  # K distinct experts per token
        w = torch.rand(qlen, K) + 0.1
        return ids, w / w.sum(dim=1, keepdim=True)

    for qlen, n in zip(args.qlen, iters):
        x = torch.randn(qlen, H).to(torch.bfloat16)
        patterns = [routing(qlen) for _ in range(min(n + args.warmup, 16))]
        with torch.inference_mode():
            times = []
            for i in range(args.warmup):
                t = time.perf_counter()
                moe(x, *patterns[i % len(patterns)])
                t = time.perf_counter() - t
                if t > 2.0:
                    # A call this slow is dominated by its arithmetic, not by first-call overheads: count
                    # it, so that slow machines stay within --max-seconds.
                    times.append(t)
                    break
            start = time.perf_counter()
            for i in range(len(times), n):
                if times and time.perf_counter() - start + statistics.median(times) > args.max_seconds:
                    break
                ids, w = patterns[(i + args.warmup) % len(patterns)]
                t = time.perf_counter()
                moe(x, ids, w)
                times.append(time.perf_counter() - t)
        sec = statistics.median(times)
        flop = 2.0 * 3.0 * H * I * K * qlen
        print(json.dumps({
            "qlen": qlen,
            "seconds_per_iter": sec,
            "tflops": flop / sec / 1e12,
            "iters": len(times),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "setup_seconds": round(setup_s, 2),
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
