"""KTMoEWrapper(threadpool_count=N, numa_nodes=[...]): NUMA sub-pools with the layer split N ways along
moe_intermediate_size (kt/moe/tp_layer.h). On these one-node machines every part sits on node 0, and
threadpool_count 2 and 4 must give the threadpool_count 1 result: via forward and via submit/sync (CPU
tensors), with a GPU-expert mask, from tensors and from a weight_path folder (Hugging Face and kt convert),
for BF16, an int8 and int4 methods and FP8; and bad numa_nodes / threadpool_count / cpuinfer_threads raise
ValueError naming the argument.

Tolerance. The parts hold exactly the whole layer's weights (quantized forms are quantized whole, then cut),
and h is quantized as the whole layer does it: per group for the group methods (no group straddles two
parts), and for the per-row ones (AMXINT8, MOE_INT4) against the whole row's max, which the parts exchange
mid-layer (kt/moe/expert_pipeline.h: HScaleShare), so each part's h codes are a slice of the whole layer's.
So for every method the only difference is the order of the fp32 additions: each part sums its slice of the
down products and the parts are added in part order. Two fp32 sums of the same terms differ by a few fp32
ulps of the terms' magnitude (~1e-7 relative), far below the output's single bf16 rounding; so each bf16
output equals the TP = 1 output or is one bf16 step (2^-8 relative, 2^-7 allowed for the boundary case)
away; REDUCE_ABS (1e-5 of the largest output) covers outputs near zero where that step is tiny.
"""

from __future__ import annotations

import os
import sys
import subprocess
import tempfile

import pytest
import torch

from kt_kernel import KTMoEWrapper, _native
from kt_kernel import serving
from moe_reference import random_experts, random_routing, relative_error, wrapper_args
import testdata

E, K, H, I = 8, 3, 128, 256
REDUCE_REL, REDUCE_ABS = 2.0**-7, 1e-5
QLEN = 9


def make(method, tp, mask=None, group_size=128, nodes=None, weight_path=None, shape=None, threads=4, **kw):
    E_, K_, H_, I_ = shape or (E, K, H, I)
    return KTMoEWrapper(**wrapper_args(
        E_, K_, H_, I_, method=method, threadpool_count=tp, numa_nodes=nodes, cpuinfer_threads=threads,
        gpu_experts_mask=mask, group_size=group_size, weight_path=weight_path, chunked_prefill_size=16, **kw))


def assert_same(out, ref):
    out, ref = out.float(), ref.float()
    bound = ref.abs() * REDUCE_REL + REDUCE_ABS * ref.abs().max()
    worst = ((out - ref).abs() - bound).max().item()
    assert worst <= 0, f"beyond the fp32 reduce-order tolerance by {worst:.3e}"


def both_paths(moe, x, ids, weights):
    """forward, and submit_forward/sync_forward with int32 ids (the serving engine's), on CPU tensors."""
    out = moe.forward(x, ids, weights)
    moe.submit_forward(x, ids.to(torch.int32), weights)
    return out, moe.sync_forward(x)


# (method, group_size)
METHODS = [("BF16", 128), ("AMXINT8", 128), ("MOE_INT4", 128), ("AMXINT4_KGroup", 32), ("FP8", 128)]


@pytest.mark.parametrize("method,group_size", METHODS)
def test_tp_matches_one_pool_from_tensors(method, group_size):
    gate, up, down = random_experts(E, H, I, seed=3)
    x, ids, weights = random_routing(QLEN, H, E, K, seed=4)
    ids[0, 0] = -1  # padding
    results = {}
    for tp in (1, 2, 4):
        if method == "FP8" and tp == 4:
            continue  # parts of I / 4 = 64 columns would cut FP8's 128-wide block scales
        mask = torch.zeros(E, dtype=torch.bool)  # experts 1 and 5 on the GPU
        mask[[1, 5]] = True
        moe = make(method, tp, mask=mask, group_size=group_size)
        moe.load_weights_from_tensors(gate, up, down, None)
        masked = both_paths(moe, x, ids, weights)
        moe.gpu_experts_mask.zero_()  # flipped in place: read at every forward
        results[tp] = masked + both_paths(moe, x, ids, weights)
        if tp > 1:
            assert moe.numa_placement == [i % _native._kt.numa_node_count() for i in range(tp)] \
                if _native._kt.numa_available() else [-1] * tp
    for tp in results:
        for got, want in zip(results[tp], results[1]):
            assert_same(got, want)
    # the mask mattered
    assert relative_error(results[1][0], results[1][2]) > 1e-2


def _e4m3_codes(v: torch.Tensor) -> torch.Tensor:
    """The E4M3 (fn) code nearest to each value (|v| <= 448), as uint8: torch 1.13 has no float8 dtype, and
    FP8MoEWrapper takes the same bytes as uint8."""
    c = torch.arange(127)
    e, m = c >> 3, (c & 7).float()
    table = torch.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7).float())  # codes 0..126, ascending
    a = v.abs().float().flatten()
    hi = torch.bucketize(a, table).clamp(max=126)
    lo = (hi - 1).clamp(min=0)
    code = torch.where((a - table[lo]).abs() <= (table[hi] - a).abs(), lo, hi)
    code = code | ((v.flatten() < 0).long() << 7)
    return code.to(torch.uint8).reshape(v.shape).contiguous()


def test_fp8_codes_tp_matches_one_pool():
    """FP8 from E4M3 codes and 128 x 128 block scales, as shipped (load_weights_fp8: cut per part, never
    requantized)."""
    gate, up, down = random_experts(E, H, I, seed=5)
    x, ids, weights = random_routing(QLEN, H, E, K, seed=6)

    def quant(w):  # DeepSeek's quantizer: scale = amax / 448 per block
        e, n, k = w.shape
        blocks = w.float().reshape(e, n // 128, 128, k // 128, 128)
        scale = blocks.abs().amax(dim=(2, 4)) / 448.0
        return _e4m3_codes((blocks / scale[:, :, None, :, None]).reshape(e, n, k)), scale.contiguous()

    (g, gs), (u, us), (d, ds) = quant(gate), quant(up), quant(down)
    one, two = make("FP8", 1), make("FP8", 2)
    for moe in (one, two):
        moe.load_weights_from_tensors(g, u, d, None, gs, us, ds)
    want = one.forward(x, ids, weights)
    assert relative_error(want, make_bf16_reference(gate, up, down, x, ids, weights)) < 0.1  # codes are sane
    assert_same(two.forward(x, ids, weights), want)


def make_bf16_reference(gate, up, down, x, ids, weights):
    ref = make("BF16", 1)
    ref.load_weights_from_tensors(gate, up, down, None)
    return ref.forward(x, ids, weights)


def test_deferred_experts_with_tp():
    """Deferred experts through submit/sync: TP = 2 gives the one-pool layers' outputs."""
    gate, up, down = random_experts(E, H, I, seed=7)
    x, ids, weights = random_routing(QLEN, H, E, K, seed=8)
    outs = {}
    for tp in (1, 2):
        # layer 0 defers 1 expert per token into layer 1; the last layer gets none
        layers = [make("BF16", tp, layer_idx=i, max_deferred_experts_per_token=1 - i) for i in range(2)]
        for moe in layers:
            moe.load_weights_from_tensors(gate, up, down, None)
        layers[0].submit_forward(x, ids, weights)
        first = layers[0].sync_forward(x).clone()
        layers[1].submit_forward(x, ids, weights)
        outs[tp] = (first, layers[1].sync_forward(x))
    serving.task_queue().sync()
    for got, want in zip(outs[2], outs[1]):
        assert_same(got, want)


kt_binary = testdata.kt_binary


@pytest.mark.parametrize("method,converted", [("BF16", False), ("AMXINT8", False), ("AMXINT8", True)])
def test_weight_path_tp(method, converted):
    """weight_path folders (Hugging Face, or kt convert's, written once for any threadpool_count) load sliced."""
    arch = "qwen3_moe"
    shape = testdata.shape(arch)
    path = testdata.path(arch)
    with tempfile.TemporaryDirectory(prefix="kt_tp_") as tmp:
        if converted:
            path = os.path.join(tmp, "conv")
            r = subprocess.run([kt_binary(), "convert", "--input", testdata.path(arch), "--output", path,
                                "--method", method, "--threads", "2"], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        x, ids, weights = random_routing(QLEN, shape[2], shape[0], shape[1], seed=9)
        outs = {}
        for tp in (1, 2, 4):
            moe = make(method, tp, weight_path=path, shape=shape, layer_idx=int(testdata.reference(arch)["layer"]))
            moe.load_weights()
            assert moe.last_load_stats["converted"] == converted
            outs[tp] = moe.forward(x, ids, weights)
        for tp in (2, 4):
            assert_same(outs[tp], outs[1])


def test_bad_numa_arguments_name_them():
    with pytest.raises(ValueError, match=r"threadpool_count\) = 3 must be >= 1 and divide moe_intermediate_size"):
        make("BF16", 3)
    with pytest.raises(ValueError, match=r"cpuinfer_threads = 1 is fewer than threadpool_count = 2"):
        make("BF16", 2, threads=1)
    with pytest.raises(ValueError, match=r"numa_nodes must list one node per sub-pool"):
        make("BF16", 2, nodes=[0])
    with pytest.raises(ValueError, match=r"numa_nodes\[0\] must be"):
        make("BF16", 2, nodes=[-1, 0])
    # a node that does not exist (or NUMA unavailable): no silent fallback to unpinned pools
    with pytest.raises(ValueError, match=r"numa_nodes\[1\]" if _native._kt.numa_available() else r"numa_nodes\[0\]"):
        make("BF16", 2, nodes=[0, 4096])
    with pytest.raises(ValueError, match=r"FP8 \(128 x 128 block scales\) needs a multiple of 128"):
        make("FP8", 4)


def test_explicit_single_node():
    """numa_nodes=[0] with threadpool_count=1: one pool, pinned to node 0 (honoured, not ignored)."""
    if not _native._kt.numa_available():
        pytest.skip("NUMA not available")
    moe = make("BF16", 1, nodes=[0])
    assert moe.numa_placement == [0]
    gate, up, down = random_experts(E, H, I, seed=3)
    moe.load_weights_from_tensors(gate, up, down, None)
    x, ids, weights = random_routing(QLEN, H, E, K, seed=4)
    ref = make("BF16", 1)
    ref.load_weights_from_tensors(gate, up, down, None)
    assert torch.equal(moe.forward(x, ids, weights), ref.forward(x, ids, weights))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
