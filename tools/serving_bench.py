#!/usr/bin/env python3
"""The serving runtime's costs, as a serving engine sees them (docs/SERVING.md, docs/PERFORMANCE.md).

1. Overhead per call of submit + sync, with nothing to compute (every expert on the "GPU" by the mask):
   - the task queue through the Python bindings (queue.submit + queue.sync of the layer's task);
   - the wrapper's submit_forward + sync_forward on CPU tensors (argument checks and staging included);
   with CUDA also
   - the queue through a CUDA stream (cudaLaunchHostFunc to submit and to wait), timed on the host over many
     calls and one final synchronize;
   - the wrapper's submit_forward + sync_forward on CUDA tensors with a CUDA stream.
2. A multi-layer decode step (--layers layers of the --shape model, batch --batch), on CUDA: per layer, the
   GPU's own work of a layer on the main stream) overlapped with kt's CPU experts submitted on a side stream,
   as SGLang's hybrid path does; against the serial sum of the two parts measured alone. The stand-in for
   the GPU's work (--gpu-stand-in): "one-matmul" (default), one bf16 [m, m] x [m, m] matmul per layer, m
   calibrated so that it takes about as long as kt's layer (one kernel, as a captured decode graph launches
   its work without the host); "small-matmuls", n bf16 [batch, H] x [H, H] matmuls per layer, n calibrated
   likewise (host-launch-bound: the Python thread issuing them needs a CPU while kt computes). kt gets all
   CPUs but one by default (--threads): the thread that launches the GPU work needs one, as a serving
   engine's scheduler does.
   Without CUDA only part 1's CPU lines run.

    PYTHONPATH=<kt_kernel's folder> python3 tools/serving_bench.py [--layers 8] [--method BF16] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

SHAPES = {  # name: (experts, top-k, hidden, intermediate)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "deepseek-v3": (256, 8, 7168, 2048),
    "tiny": (16, 4, 256, 128),
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_layer(idx, shape, method, threads, mask, seed):
    from kt_kernel import KTMoEWrapper

    E, K, H, I = shape
    moe = KTMoEWrapper(
        layer_idx=idx, num_experts=E, num_experts_per_tok=K, hidden_size=H, moe_intermediate_size=I,
        gpu_experts_mask=mask, cpuinfer_threads=threads, threadpool_count=1, weight_path=None,
        chunked_prefill_size=512, method=method,
    )
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(E, I, H, generator=g) * H ** -0.5).to(torch.bfloat16)
    up = (torch.randn(E, I, H, generator=g) * H ** -0.5).to(torch.bfloat16)
    down = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(torch.bfloat16)
    moe.load_weights_from_tensors(gate, up, down, None)
    return moe


def routing(batch, shape, seed, device):
    E, K, H, _ = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, H, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(batch)]).to(torch.int32)
    w = torch.rand(batch, K, generator=g)
    w = w / w.sum(-1, keepdim=True)
    return x.to(device), ids.to(device), w.to(device)


def per_call_us(fn, calls, sync=None) -> float:
    """Median over 5 rounds of the mean time per call of `calls` calls (sync() once at the end of a round)."""
    for _ in range(min(calls, 200)):
        fn()
    if sync:
        sync()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync:
            sync()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(rounds)


def overhead(args, cuda: bool):
    from kt_kernel import serving

    shape = SHAPES["tiny"]
    E = shape[0]
    mask = torch.ones(E, dtype=torch.bool)  # every expert "on the GPU": the task computes nothing
    if cuda:
        mask = mask.pin_memory()
    moe = make_layer(0, shape, "BF16", args.threads, mask, seed=1)
    x, ids, w = routing(1, shape, 2, "cpu")
    queue = serving.task_queue()
    moe.submit_forward(x, ids, w, None)
    moe.sync_forward(x, None)
    # The layer's queued task (kt_kernel.serving builds one per staging buffer; a benchmark may look inside).
    task = next(iter(moe._serving._tasks.values()))
    n = args.calls
    print("Overhead per call, nothing to compute (every expert masked off), batch 1:")
    us = per_call_us(lambda: (queue.submit(task), queue.sync()), n)
    print(f"  queue.submit + queue.sync (bindings, no CUDA)           {us:7.2f} us   (goal <= 5 us)")
    us = per_call_us(lambda: (moe.submit_forward(x, ids, w, None), moe.sync_forward(x, None)), n)
    print(f"  submit_forward + sync_forward, CPU tensors               {us:7.2f} us")
    if not cuda:
        print("  (no CUDA here: the stream lines need the GPU host)")
        return
    side = torch.cuda.Stream()
    s = side.cuda_stream
    us = per_call_us(lambda: (queue.submit_with_cuda_stream(s, task), queue.sync_with_cuda_stream(s)), n,
                     side.synchronize)
    print(f"  queue submit + sync through a CUDA stream (bindings)     {us:7.2f} us   (goal <= 20 us)")
    xg, idsg, wg = x.cuda(), ids.cuda(), w.cuda()
    with torch.cuda.stream(side):
        us = per_call_us(lambda: (moe.submit_forward(xg, idsg, wg, s), moe.sync_forward(xg, s)), n,
                         side.synchronize)
    print(f"  submit_forward + sync_forward, CUDA tensors and stream   {us:7.2f} us")


def decode_step(args):
    shape = SHAPES[args.shape]
    E, K, H, I = shape
    dev = torch.device("cuda")
    print(f"\nDecode step: {args.layers} layers of {args.shape} (E={E}, top-k={K}, H={H}, I={I}), batch {args.batch}, "
          f"{args.method}, {args.threads} CPU threads; all experts on the CPU")
    t0 = time.perf_counter()
    layers = [make_layer(i, shape, args.method, args.threads, None, seed=10 + i) for i in range(args.layers)]
    print(f"  weights: random, made and packed in {time.perf_counter() - t0:.1f} s")
    inputs = [routing(args.batch, shape, 100 + i, dev) for i in range(args.layers)]
    side = torch.cuda.Stream()
    main = torch.cuda.current_stream()

    mats = {}
    small = args.gpu_stand_in == "small-matmuls"

    def gpu_work(m):
        """one-matmul: [m, m] x [m, m]; small-matmuls: m matmuls [batch, H] x [H, H]."""
        if small:
            if "b" not in mats:
                mats["a"] = torch.randn(args.batch, H, device=dev, dtype=torch.bfloat16)
                mats["b"] = torch.randn(H, H, device=dev, dtype=torch.bfloat16) * H ** -0.5
            y = mats["a"]
            for _ in range(m):
                y = y @ mats["b"]
            return y
        if m not in mats:
            mats[m] = torch.randn(m, m, device=dev, dtype=torch.bfloat16) * m ** -0.5
        return mats[m] @ mats[m]

    def cpu_only():
        for moe, (x, ids, w) in zip(layers, inputs):
            with torch.cuda.stream(side):
                moe.submit_forward(x, ids, w, side.cuda_stream)
                out = moe.sync_forward(x, side.cuda_stream)
        side.synchronize()
        return out

    def timed(fn, reps):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    t_cpu = timed(cpu_only, args.steps)
    m = args.gpu_size
    if m is None and small:  # calibrate: n small matmuls about as long as kt's layer
        one = timed(lambda: gpu_work(64), args.steps) / 64
        m = max(1, round(t_cpu / args.layers / one))
    elif m is None:  # calibrate: one matmul about as long as kt's layer (time grows as m^3)
        m = 4096
        for _ in range(3):
            one = timed(lambda: gpu_work(m), args.steps)
            m = max(256, int(round(m * (t_cpu / args.layers / one) ** (1 / 3) / 256)) * 256)
    t_gpu = timed(lambda: [gpu_work(m) for _ in range(args.layers)], args.steps)

    def serial():
        for moe, (x, ids, w) in zip(layers, inputs):
            y = gpu_work(m)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                moe.submit_forward(x, ids, w, side.cuda_stream)
                out = moe.sync_forward(x, side.cuda_stream)
            main.wait_stream(side)
            y = y.view(-1)[:1] + out.view(-1)[:1]  # the GPU waits for kt before its next layer
        return y

    def overlapped():
        for moe, (x, ids, w) in zip(layers, inputs):
            side.wait_stream(main)
            with torch.cuda.stream(side):
                moe.submit_forward(x, ids, w, side.cuda_stream)
            y = gpu_work(m)  # the GPU's own work of the layer, while kt computes
            with torch.cuda.stream(side):
                out = moe.sync_forward(x, side.cuda_stream)
            main.wait_stream(side)
            y = y.view(-1)[:1] + out.view(-1)[:1]
        return y

    t_serial = timed(serial, args.steps)
    t_over = timed(overlapped, args.steps)
    what = (f"{m} matmuls [{args.batch},{H}]x[{H},{H}] per layer" if small
            else f"one bf16 [{m},{m}]x[{m},{m}] matmul per layer")
    print(f"  GPU part alone      {t_gpu:8.3f} ms  ({what})")
    print(f"  kt part alone       {t_cpu:8.3f} ms  ({t_cpu / args.layers * 1e3:.0f} us per layer)")
    print(f"  serial step         {t_serial:8.3f} ms  (sum of the parts {t_gpu + t_cpu:.3f} ms)")
    print(f"  overlapped step     {t_over:8.3f} ms  = {t_over / t_serial:.2f} of serial; the bound max(parts) is "
          f"{max(t_gpu, t_cpu):.3f} ms ({max(t_gpu, t_cpu) / t_serial:.2f} of serial)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() - 1),
                    help="kt's CPU threads (default: all CPUs but the one launching the GPU work)")
    ap.add_argument("--calls", type=int, default=2000, help="calls per round of the overhead lines")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--method", default="BF16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--gpu-stand-in", choices=["one-matmul", "small-matmuls"], default="one-matmul")
    ap.add_argument("--gpu-size", type=int, default=None,
                    help="one-matmul: its m; small-matmuls: how many per layer (default: calibrated)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    print(f"kt serving bench: CPU {cpu_name()}, {os.cpu_count()} CPUs"
          + (f"; GPU {torch.cuda.get_device_name()}" if cuda else "; no GPU") + f"; torch {torch.__version__}")
    overhead(args, cuda)
    if cuda:
        decode_step(args)


if __name__ == "__main__":
    main()
