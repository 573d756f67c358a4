"""submit_forward / sync_forward (kt_kernel/serving.py) against forward() and the PyTorch reference.

On CPU (CI): int32 and int64 ids, -1 padding, batches longer than chunked_prefill_size, the GPU-expert mask
flipped in place between calls, deferred experts (layer L's immediate output plus layer L+1's output equal
both layers computed whole), the capture-size buffer cache and argument errors. On a machine with CUDA (the
GPU host) the client's sequence with real GPU work on the main stream, and a CUDA graph replayed at several
batch sizes with the inputs and the mask changed between replays.
"""

from __future__ import annotations

import sys
import time

import pytest
import torch

from kt_kernel import KTMoEWrapper
from kt_kernel import serving
from moe_reference import REL_TOL, random_experts, random_routing, reference_moe, relative_error, wrapper_args

E, K, H, I = 8, 3, 128, 64


def make(layer_idx=0, mask=None, chunk=16, deferred=None, seed=1):
    moe = KTMoEWrapper(
        **wrapper_args(
            E, K, H, I, layer_idx=layer_idx, gpu_experts_mask=mask, chunked_prefill_size=chunk, method="BF16",
            max_deferred_experts_per_token=deferred,
        )
    )
    gate, up, down = random_experts(E, H, I, seed=seed)
    moe.load_weights_from_tensors(gate, up, down, None)
    return moe, (gate, up, down)


def check(out, ref):
    err = relative_error(out, ref)
    assert err <= REL_TOL, f"max|err|/max|ref| = {err:.3e} > {REL_TOL}"


@pytest.fixture(autouse=True)
def fresh_buffers():
    KTMoEWrapper.clear_buffer_cache()
    yield
    serving.task_queue().sync()
    KTMoEWrapper.set_capture_batch_sizes([])
    KTMoEWrapper.clear_buffer_cache()


def test_submit_sync_equals_forward_with_int64_and_int32_ids():
    moe, w = make()
    x, ids, wt = random_routing(9, H, E, K, seed=3)
    ids[2, 1] = -1  # padding
    expected = moe.forward(x, ids, wt, None)
    for id_dtype in (torch.int64, torch.int32):
        moe.submit_forward(x, ids.to(id_dtype), wt, None)
        out = moe.sync_forward(x, None)
        assert torch.equal(out, expected), id_dtype
    check(expected, reference_moe(x, ids, wt, *w))


def test_longer_than_chunked_prefill_size_runs_in_chunks():
    moe, w = make(chunk=16)
    x, ids, wt = random_routing(45, H, E, K, seed=4)
    with pytest.raises(ValueError, match="chunked_prefill_size"):
        moe.forward(x, ids, wt, None)  # the synchronous call does not chunk
    moe.submit_forward(x, ids, wt, None)
    check(moe.sync_forward(x, None), reference_moe(x, ids, wt, *w))


def test_mask_flipped_in_place_between_calls():
    mask = torch.zeros(E, dtype=torch.bool)
    moe, w = make(mask=mask)
    x, ids, wt = random_routing(6, H, E, K, seed=5)
    for r in range(3):
        mask.copy_(torch.tensor([(e + r) % 3 == 0 for e in range(E)]))
        moe.submit_forward(x, ids, wt, None)
        check(moe.sync_forward(x, None), reference_moe(x, ids, wt, *w, gpu_experts_mask=mask))


def test_num_gpu_experts_is_a_mask_of_the_first_n():
    moe = KTMoEWrapper(**wrapper_args(E, K, H, I, method="BF16", num_gpu_experts=3))
    assert moe.gpu_experts_mask.tolist() == [True] * 3 + [False] * (E - 3)
    with pytest.raises(ValueError, match="not both"):
        KTMoEWrapper(**wrapper_args(E, K, H, I, method="BF16", num_gpu_experts=3,
                                    gpu_experts_mask=torch.zeros(E, dtype=torch.bool)))
    with pytest.raises(ValueError, match="num_gpu_experts"):
        KTMoEWrapper(**wrapper_args(E, K, H, I, method="BF16", num_gpu_experts=E + 1))


def test_deferred_experts_arrive_one_layer_late():
    # Layer 0 defers one expert per token where it can; layer 1 (the last) defers none. Layer 1's output
    # carries layer 0's deferred part, so out0 + out1 = whole0(x0) + whole1(x1).
    l0, w0 = make(layer_idx=0, deferred=1, seed=10)
    l1, w1 = make(layer_idx=1, deferred=None, seed=11)
    x0, ids0, wt0 = random_routing(3, H, E, K, seed=12)
    x1, ids1, wt1 = random_routing(3, H, E, K, seed=13)
    l0.submit_forward(x0, ids0, wt0, None)
    out0 = l0.sync_forward(x0, None)
    l1.submit_forward(x1, ids1, wt1, None)
    out1 = l1.sync_forward(x1, None)
    whole0 = reference_moe(x0, ids0, wt0, *w0)
    whole1 = reference_moe(x1, ids1, wt1, *w1)
    check(out0.float() + out1.float(), whole0 + whole1)
    # Something really was deferred: layer 0's own output is not its whole forward.
    assert relative_error(out0, whole0) > REL_TOL


def test_capture_sizes_keep_their_buffers():
    KTMoEWrapper.set_capture_batch_sizes([4, 2])
    assert KTMoEWrapper.get_capture_batch_sizes() == [2, 4]
    moe, w = make()
    x, ids, wt = random_routing(4, H, E, K, seed=6)
    moe.submit_forward(x, ids, wt, None)
    moe.sync_forward(x, None)
    kept = dict(serving._BufferCache.kept)
    assert len(kept) == 1
    moe.submit_forward(x, ids, wt, None)
    check(moe.sync_forward(x, None), reference_moe(x, ids, wt, *w))
    assert serving._BufferCache.kept == kept  # same objects, same addresses
    KTMoEWrapper.clear_buffer_cache()
    assert not serving._BufferCache.kept


def test_errors_name_the_problem():
    moe, _ = make()
    x, ids, wt = random_routing(2, H, E, K, seed=7)
    with pytest.raises(RuntimeError, match="without a submit_forward"):
        moe.sync_forward(x, None)
    with pytest.raises(ValueError, match="cuda_stream"):
        moe.submit_forward(x, ids, wt, 12345)
    with pytest.raises(TypeError, match="topk_ids"):
        moe.submit_forward(x, ids.float(), wt, None)
    with pytest.raises(ValueError, match="hidden_size"):
        moe.submit_forward(x[:, :64].contiguous(), ids, wt, None)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU host)")


@needs_cuda
def test_client_sequence_on_cuda_streams_overlaps_gpu_work():
    dev = torch.device("cuda")
    mask = torch.zeros(E, dtype=torch.bool).pin_memory()
    mask[:2] = True  # experts 0 and 1 "on the GPU"
    moe, w = make(mask=mask)
    x, ids, wt = random_routing(5, H, E, K, seed=8)
    xg, idsg, wtg = x.to(dev), ids.to(torch.int32).to(dev), wt.to(dev)
    expected = moe.forward(x, ids, wt, None)
    side = torch.cuda.Stream()
    a = torch.randn(4096, 4096, device=dev)

    def step(gpu_work: int):
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            moe.submit_forward(xg, idsg, wtg, side.cuda_stream)
        for _ in range(gpu_work):
            a.mul_(0.5).add_(1.0)  # the GPU experts' stand-in
        with torch.cuda.stream(side):
            cpu_out = moe.sync_forward(xg, side.cuda_stream)
        main.wait_stream(side)
        return cpu_out

    out = step(1)
    torch.cuda.synchronize()
    assert out.is_cuda
    assert torch.equal(out.cpu(), expected)
    # Overlap: CPU work and GPU work together take less than one after the other.
    t0 = time.perf_counter(); step(0); torch.cuda.synchronize(); t_cpu = time.perf_counter() - t0
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        a.mul_(0.5).add_(1.0)
    torch.cuda.synchronize()
    t_gpu = time.perf_counter() - t0
    t0 = time.perf_counter(); step(n); torch.cuda.synchronize(); t_both = time.perf_counter() - t0
    print(f"cpu-only {t_cpu*1e3:.2f} ms, gpu-only {t_gpu*1e3:.2f} ms, both {t_both*1e3:.2f} ms", file=sys.stderr)
    assert t_both < t_cpu + t_gpu


@needs_cuda
def test_cuda_graph_replays_with_batch_size_and_mask_changed():
    dev = torch.device("cuda")
    mask = torch.zeros(E, dtype=torch.bool).pin_memory()
    moe, w = make(mask=mask)
    sizes = [1, 4, 7]
    KTMoEWrapper.set_capture_batch_sizes(sizes)
    graphs = {}
    static = {}
    for bs in sizes:
        x, ids, wt = random_routing(bs, H, E, K, seed=bs)
        static[bs] = (x.to(dev), ids.to(torch.int32).to(dev), wt.to(dev))
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up allocates the buffers outside capture
            moe.submit_forward(*static[bs], s.cuda_stream)
            moe.sync_forward(static[bs][0], s.cuda_stream)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            stream = torch.cuda.current_stream().cuda_stream
            moe.submit_forward(*static[bs], stream)
            out = moe.sync_forward(static[bs][0], stream)
        graphs[bs] = (g, out)
    for r, bs in enumerate([4, 1, 7, 4]):
        x, ids, wt = random_routing(bs, H, E, K, seed=100 + r)
        xs, idss, wts = static[bs]
        xs.copy_(x); idss.copy_(ids); wts.copy_(wt)
        mask.copy_(torch.tensor([(e + r) % 4 == 0 for e in range(E)]))
        g, out = graphs[bs]
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), moe.forward(x, ids, wt, None)), (r, bs)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
