#!/usr/bin/env python3
"""PyTorch yardstick for `kt bench`: the bf16 eager loop over experts of one MoE layer.

For every activated expert: index its tokens, h = silu(x @ Wg.T) * (x @ Wu.T), y = h @ Wd.T, and add
y * routing weight into the output with index_add_ (the usual Hugging Face style loop). Weights are random
(this measures time, not accuracy). Prints one JSON line per qlen:
  {"qlen": 1, "seconds_per_iter": ..., "tflops": ..., ...}
For qlen >= --dense-min-qlen the line also carries the same FLOPs as dense GEMMs (oneDNN's best case: every
expert gets exactly qlen*topk/experts rows, no gather or scatter): bf16 torch.bmm for gate+up (one [E, M, H]
x [E, H, 2I]) and down, "dense_seconds"/"dense_tflops"; and, where torch has CPU torch._int_mm, the int8
GEMMs of those shapes (one per expert), "dense_int8_seconds"/"dense_int8_tops".
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
    p.add_argument("--dense-min-qlen", type=int, default=256,
                   help="time the dense GEMMs of the same FLOPs for token counts from this one (0: never)")
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
        line = {
            "qlen": qlen,
            "seconds_per_iter": sec,
            "tflops": flop / sec / 1e12,
            "iters": len(times),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "setup_seconds": round(setup_s, 2),
        }
        if args.dense_min_qlen and qlen >= args.dense_min_qlen:
            line.update(dense(torch, F, wg, wu, wd, K, qlen, max(n, 2), args.max_seconds))
        print(json.dumps(line), flush=True)
    return 0


def timed(fn, iters, max_seconds):
    fn()  # warm-up: oneDNN's first call picks and packs its kernels
    times = []
    start = time.perf_counter()
    while len(times) < iters and (not times or time.perf_counter() - start < max_seconds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def dense(torch, F, wg, wu, wd, topk, qlen, iters, max_seconds):
    """The layer's FLOPs as dense GEMMs with perfectly balanced routing (the ceiling of a GEMM library):
    every expert gets M = qlen * topk / E rows (the FLOPs are counted from M, so a rounded M is fair)."""
    E, I, H = wg.shape
    M = max(1, round(qlen * topk / E))
    flop = 2.0 * 3.0 * H * I * E * M
    out = {"dense_rows_per_expert": M}
    with torch.inference_mode():
        w_gu = torch.cat([wg, wu], dim=1).transpose(1, 2).contiguous()  # [E, H, 2I]
        w_d = wd.transpose(1, 2).contiguous()  # [E, I, H]
        x = torch.randn(E, M, H).to(torch.bfloat16)

        def bf16():
            gu = torch.bmm(x, w_gu)
            h = F.silu(gu[:, :, :I]) * gu[:, :, I:]
            return torch.bmm(h, w_d)

        sec = timed(bf16, iters, max_seconds)
        out.update({"dense_seconds": sec, "dense_tflops": flop / sec / 1e12})
        int_mm = getattr(torch, "_int_mm", None)
        if int_mm is not None:
            try:
                # torch._int_mm: int8 x int8 -> int32 (oneDNN on CPU), one call per expert and GEMM; the
                # activation quantization between them is left out (a lower bound on the time).
                q_gu = torch.randint(-127, 128, (E, H, 2 * I), dtype=torch.int8)
                q_d = torch.randint(-127, 128, (E, I, H), dtype=torch.int8)
                q_x = torch.randint(-127, 128, (E, max(M, 17), H), dtype=torch.int8)
                q_h = torch.randint(-127, 128, (E, max(M, 17), I), dtype=torch.int8)

                def int8():
                    for e in range(E):
                        int_mm(q_x[e], q_gu[e])
                        int_mm(q_h[e], q_d[e])

                sec8 = timed(int8, iters, max_seconds)
                flop8 = 2.0 * 3.0 * H * I * E * max(M, 17)
                out.update({"dense_int8_seconds": sec8, "dense_int8_tops": flop8 / sec8 / 1e12})
            except RuntimeError as e:  # no CPU kernel in this build
                out["dense_int8_error"] = str(e).splitlines()[0][:200]
    return out


if __name__ == "__main__":
    sys.exit(main())
