#!/usr/bin/env python3
"""SFT benchmark: forward + backward of one MoE layer with LoRA, kt against PyTorch autograd in the same run.

    bazel run -c opt //tools:sft_benchmark                        # Qwen3-30B-A3B layer, qlen 4096, rank 16
    bazel run -c opt //tools:sft_benchmark -- --method AMXINT8_SFT --qlen 1024 --torch-iters 0
    bazel run -c opt //tools:sft_benchmark -- --method AMXINT4_KGroup_SFT --group-size 128 --qlen 1024

What is timed (seconds per iteration, median):
  kt     KTMoEWrapper(mode="sft").forward(save_for_backward=True) then .backward(grad_output)
  kt_inference_forward  (BF16 only) kt's inference forward on the same weights and routing: the floor for
         the SFT forward, measured under the same machine conditions
  torch  the same computation in eager PyTorch (bf16, the usual loop over experts; frozen base weights,
         LoRA A/B as leaf tensors requiring grad) and autograd .backward(), in this process
TFLOPS counts only the base-weight GEMMs, 6 per routed row (forward gate, up, down; backward grad_h = grad_y
W_d and grad_x = grad_g W_g + grad_u W_u), 2 H I flops each; the LoRA products (3% more at rank 16) are not
counted. kt_phases: where kt's step goes (the layer's own clock, SftTimes in kt/sft/sft_layer.h; medians):
forward and backward wall seconds, and the backward's parts (grad_y; grad_gate_up: grad_h through W_d^T;
prepare; grad_x through W_g^T, W_u^T; lora_grads: the six LoRA gradients; wait: spinning on inputs; sum:
grad_input per token; rebuild: of shared backward weights), the task kinds as their share of its wall time;
also printed as a table on stderr. With --share-backward-bb --alternate-layers, also two layers sharing the
transposed backward weights in turn: each backward then rebuilds them (alternating_layers.
backward_rebuild_seconds: the backward's median against the single layer's), with the rebuild inside the
backward's task list (overlapped, the default) and, alternating with it in the same run (--rebuild both), as
a phase before it (serial: kt before 2026-12-07; alternating_layers.serial). Memory per layer: forward
weights, transposed backward weights, the activation cache of one forward (what max_cache_depth
multiplies) and the working memory (shareable by all layers). Prints one JSON line.
"""
import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from kt_kernel import KTMoEWrapper
from kt_kernel import _native


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--qlen", type=int, default=4096)
    p.add_argument("--method", default="AMXBF16_SFT")
    p.add_argument("--group-size", type=int, default=128, help="G of AMXINT4_KGroup_SFT / AMXINT4_1KGroup_SFT")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--torch-iters", type=int, default=1, help="0: skip the PyTorch comparison")
    p.add_argument("--share-backward-bb", action="store_true")
    p.add_argument("--alternate-layers", action="store_true",
                   help="with --share-backward-bb: after the timed iterations, time a second layer of the same "
                   "shape alternating with the first, so that every backward rebuilds the shared transposed "
                   "weights from its own layer (what a model pays per layer and step with share_backward_bb)")
    p.add_argument("--rebuild", choices=["both", "overlapped", "serial"], default="both",
                   help="with --alternate-layers: the rebuild schedule(s) to time, alternating within each "
                   "iteration (serial: a phase of its own before the backward, as kt did before 2026-12-07)")
    p.add_argument("--torch-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="dtype of the PyTorch peer (torch 1.13's CPU bf16 matmul without AVX512-BF16 is ~50x "
                        "slower than its fp32 one, so on such machines float32 is the meaningful peer)")
    args = p.parse_args()
    if args.alternate_layers and not args.share_backward_bb:
        p.error("--alternate-layers needs --share-backward-bb (without it each layer keeps its own backward copy)")

    return args


def make_data(args):
    """The benchmark's weights, LoRA tensors, batch and routing (seeded), as one namespace."""
    E, K, H, I, R, T = args.experts, args.topk, args.hidden, args.inter, args.rank, args.qlen
    torch.manual_seed(1)
    torch.set_num_threads(args.threads)

    def weights(rows, cols):  # std 1/sqrt(fan_in), generated per expert to bound the fp32 peak
        w = torch.empty(E, rows, cols, dtype=torch.bfloat16)
        for e in range(E):
            w[e].copy_(torch.randn(rows, cols) / cols**0.5)
        return w

    d = SimpleNamespace(E=E, K=K, H=H, I=I, R=R, T=T)
    d.gate, d.up, d.down = weights(I, H), weights(I, H), weights(H, I)
    lora_shapes = [(E, R, H), (E, I, R), (E, R, H), (E, I, R), (E, R, I), (E, H, R)]
    d.lora = [(0.02 * torch.randn(*s)).bfloat16() for s in lora_shapes]
    d.grads = [torch.zeros(*s, dtype=torch.bfloat16) for s in lora_shapes]
    d.x = torch.randn(T, H).bfloat16()
    d.ids = torch.rand(T, E).argsort(dim=1)[:, :K].contiguous()  # K distinct experts per token
    w = torch.rand(T, K) + 0.1
    d.w = (w / w.sum(dim=1, keepdim=True)).contiguous()
    d.gout = (torch.randn(T, H) * 0.01).bfloat16()
    d.flops = 6 * 2 * H * I * K * T
    return d


def sft_layer(args, d, layer_idx):
    """An SFT layer on the benchmark's weights and LoRA tensors; returns it and its load time."""
    from kt_kernel.sft.amx import AMXSFTMoEWrapper

    layer = AMXSFTMoEWrapper(
        layer_idx=layer_idx, num_experts=d.E, num_experts_per_tok=d.K, hidden_size=d.H, moe_intermediate_size=d.I,
        num_gpu_experts=0, cpuinfer_threads=args.threads, threadpool_count=1, weight_path=None,
        chunked_prefill_size=d.T, lora_rank=d.R, lora_alpha=2.0 * d.R, max_cache_depth=1, method=args.method,
        share_backward_bb=args.share_backward_bb, group_size=args.group_size,
    )
    t0 = time.perf_counter()
    layer.load_weights_from_tensors(d.gate, d.up, d.down, None)
    load = time.perf_counter() - t0
    if not layer.skip_lora:
        layer.init_lora_weights(*d.lora, *d.grads)
    return layer, load


PHASES = ("forward", "backward", "rebuild", "grad_y", "grad_gate_up", "prepare", "grad_x", "lora_grads", "wait",
          "sum")


def step(d, layer):
    """One forward with save_for_backward and its backward: (forward seconds, backward seconds, the layer's
    own breakdown of them)."""
    t = time.perf_counter()
    layer.forward(d.x, d.ids, d.w, save_for_backward=True)
    t1 = time.perf_counter()
    layer.backward(d.gout)
    t2 = time.perf_counter()
    return t1 - t, t2 - t1, layer._layer.last_times()


def phase_medians(samples):
    """Median of each part over the steps' breakdowns."""
    return {k: round(statistics.median(s[k] for s in samples), 4) for k in PHASES}


def print_phases(rows):
    """The breakdowns as a table on stderr (stdout stays one JSON line): one column per (name, medians)."""
    names = [n for n, _ in rows]
    print("%-13s" % "seconds" + "".join("%17s" % n for n in names), file=sys.stderr)
    for k in PHASES:
        print("%-13s" % k + "".join("%17.4f" % m[k] for _, m in rows), file=sys.stderr)


def inference_yardstick(args, d):
    """kt's inference forward (no LoRA, no cache) on the same weights and routing, for AMXBF16 methods: timed
    interleaved with the SFT iterations, under the same machine conditions (the dev box is shared). The SFT
    forward runs the same three base GEMMs plus LoRA and caching; the backward three more GEMMs."""
    if not args.method.startswith("AMXBF16"):
        return None
    inf = KTMoEWrapper(
        layer_idx=0, num_experts=d.E, num_experts_per_tok=d.K, hidden_size=d.H, moe_intermediate_size=d.I,
        gpu_experts_mask=None, cpuinfer_threads=args.threads, threadpool_count=1, weight_path=None,
        chunked_prefill_size=d.T, method="BF16",
    )
    inf.load_weights_from_tensors(d.gate, d.up, d.down, None)
    return inf


def alternating_layers(args, d, moe, bwd):
    """A second layer (same shape and weights, its own memory) sharing the backward copy: in turn, each
    backward finds the copy built from the other layer and rebuilds it from its own forward weights. Each
    iteration runs every schedule of --rebuild in turn (both layers' steps per schedule), so a drift of the
    machine shows in both."""
    moe2, _ = sft_layer(args, d, 1)
    modes = ("serial", "overlapped") if args.rebuild == "both" else (args.rebuild,)
    runs = {m: ([], [], []) for m in modes}
    for i in range(args.iters + 1):  # the first of each schedule is warm-up
        for m in modes:
            for layer in (moe2, moe):
                layer._layer.overlapped_rebuild = m == "overlapped"
            for layer in (moe2, moe):
                f, b, t = step(d, layer)
                if i > 0:
                    for acc, v in zip(runs[m], (f, b, t)):
                        acc.append(v)
    out = {}
    for m in modes:
        alt_fwd, alt_bwd, times = runs[m]
        out[m] = {
            "kt_forward_seconds": round(statistics.median(alt_fwd), 4),
            "kt_backward_seconds": round(statistics.median(alt_bwd), 4),
            "backward_rebuild_seconds": round(statistics.median(alt_bwd) - statistics.median(bwd), 4),
            "kt_phases": phase_medians(times),
        }
    result = dict(out[modes[-1]])  # the default schedule (overlapped) at the top level, as before
    result["rebuild"] = modes[-1]
    if "serial" in out and "overlapped" in out:
        result["serial"] = out["serial"]
        result["overlapped_saves_seconds"] = round(
            out["serial"]["kt_backward_seconds"] - out["overlapped"]["kt_backward_seconds"], 4)
    return result


def bench_kt(args, d):
    """kt's SFT forward + backward (and the yardsticks measured beside it): the result's kt fields."""
    moe, load_s = sft_layer(args, d, 0)
    inf = inference_yardstick(args, d)
    fwd, bwd, inf_times, times = [], [], [], []
    for i in range(args.iters + 1):  # the first is warm-up (allocates the cache and workspace)
        if inf is not None:
            t = time.perf_counter()
            inf.forward(d.x, d.ids, d.w, cuda_stream=None)
            if i > 0:
                inf_times.append(time.perf_counter() - t)
        f, b, t = step(d, moe)
        if i > 0:
            fwd.append(f)
            bwd.append(b)
            times.append(t)
    kt_s = statistics.median(a + b for a, b in zip(fwd, bwd))
    d.kt_seconds = kt_s
    mem = moe.memory_bytes()
    result = {
        "device": _native._kt.cpu_brand(),
        "method": args.method,
        "format": moe.weight_format,
        "group_size": args.group_size if "KGroup" in args.method else None,
        "isa": moe.isa,
        "threads": args.threads,
        "shape": {"E": d.E, "k": d.K, "H": d.H, "I": d.I, "r": d.R, "qlen": d.T},
        "kt_seconds": round(kt_s, 4),
        "kt_forward_seconds": round(statistics.median(fwd), 4),
        "kt_backward_seconds": round(statistics.median(bwd), 4),
        "kt_tflops": round(d.flops / kt_s / 1e12, 4),
        "kt_phases": phase_medians(times),
        "load_seconds": round(load_s, 2),
        "memory_mib": {
            "weights": round(mem["weights"] / 2**20, 1),
            "backward_weights": round(mem["backward_weights"] / 2**20, 1),
            "cache_per_forward": round(moe._layer.cache_bytes_per_forward(d.T) / 2**20, 1),
            "workspace": round(mem["workspace"] / 2**20, 1),
        },
    }
    if inf_times:
        result["kt_inference_forward_seconds"] = round(statistics.median(inf_times), 4)
    rows = [("one layer", result["kt_phases"])]
    if args.alternate_layers:
        alt = alternating_layers(args, d, moe, bwd)
        result["alternating_layers"] = alt
        if "serial" in alt:
            rows.append(("alt. serial", alt["serial"]["kt_phases"]))
        rows.append(("alt. " + alt["rebuild"], alt["kt_phases"]))
    print_phases(rows)
    return result


def bench_torch(args, d, result):
    """The same step in PyTorch autograd (eager loop over experts), added to ``result``."""
    s = 2.0
    dt = getattr(torch, args.torch_dtype)
    gate, up, down = d.gate.to(dt), d.up.to(dt), d.down.to(dt)
    x, gout, ids, w = d.x.to(dt), d.gout.to(dt), d.ids, d.w
    params = [t.to(dt).requires_grad_() for t in d.lora] if not args.method.endswith("SkipLoRA") else None

    def torch_step():
        xr = x.clone().requires_grad_()
        wr = w.clone().requires_grad_()
        out = torch.zeros(d.T, d.H, dtype=dt)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.where(ids == e)
            xe = xr[tok]
            g = xe @ gate[e].T
            u = xe @ up[e].T
            if params is not None:
                g = g + s * (xe @ params[0][e].T) @ params[1][e].T
                u = u + s * (xe @ params[2][e].T) @ params[3][e].T
            h = F.silu(g) * u
            y = h @ down[e].T
            if params is not None:
                y = y + s * (h @ params[4][e].T) @ params[5][e].T
            out = out.index_add(0, tok, y * wr[tok, slot, None].to(y.dtype))
        out.backward(gout)

    times = []
    for _ in range(args.torch_iters):
        t = time.perf_counter()
        torch_step()
        times.append(time.perf_counter() - t)
    torch_s = statistics.median(times)
    result["torch_seconds"] = round(torch_s, 4)
    result["torch_tflops"] = round(d.flops / torch_s / 1e12, 4)
    result["speedup_vs_torch"] = round(torch_s / d.kt_seconds, 2)
    result["torch_version"] = torch.__version__
    result["torch_dtype"] = args.torch_dtype


def main():
    args = parse_args()
    d = make_data(args)
    result = bench_kt(args, d)
    gc.collect()  # kt's layers are gone: their memory is not counted against PyTorch's
    if args.torch_iters > 0:
        bench_torch(args, d, result)
    result["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
