"""KTMoEWrapper(method="BF16") against the PyTorch reference on random data."""

from __future__ import annotations

import sys

import pytest
import torch

import kt_kernel
from kt_kernel import KTMoEWrapper, _native
from moe_reference import REL_TOL, random_experts, random_routing, reference_moe, relative_error, wrapper_args


def make_moe(E, k, H, I, *, mask=None, threads=2, max_len=64, layer_idx=0):
    return KTMoEWrapper(
        **wrapper_args(
            E,
            k,
            H,
            I,
            layer_idx=layer_idx,
            gpu_experts_mask=mask,
            cpuinfer_threads=threads,
            chunked_prefill_size=max_len,
            method="BF16",
        )
    )


def check(out, ref):
    assert out.dtype == torch.bfloat16
    assert out.shape == ref.shape
    assert torch.isfinite(out.float()).all()
    err = relative_error(out, ref)
    assert err <= REL_TOL, f"max|err|/max|ref| = {err:.3e} > {REL_TOL}"


# (E, k, H, I, qlen): decode (qlen 1), odd qlen, k = 1 and k > 1, more tokens than experts.
SHAPES = [
    (8, 2, 128, 64, 1),
    (8, 2, 128, 64, 7),
    (8, 1, 128, 64, 5),
    (16, 4, 256, 128, 33),
    (4, 4, 64, 128, 3),
    (6, 3, 72, 40, 5),  # Sizes that are not multiples of any SIMD width or block.
]


@pytest.mark.parametrize("E,k,H,I,qlen", SHAPES)
def test_matches_reference(E, k, H, I, qlen):
    gate, up, down = random_experts(E, H, I, seed=E * 1000 + H + I)
    moe = make_moe(E, k, H, I)
    moe.load_weights_from_tensors(gate, up, down, None)
    x, ids, w = random_routing(qlen, H, E, k, seed=qlen)
    out = moe.forward(x, ids, w, None)
    check(out, reference_moe(x, ids, w, gate, up, down))


def test_backend_and_variant():
    moe = make_moe(4, 2, 64, 64)
    assert isinstance(moe, kt_kernel.NativeMoEWrapper)
    assert moe.isa == kt_kernel.__cpu_variant__
    assert kt_kernel.__cpu_variant__ in ("scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")


def test_invalid_ids_contribute_nothing():
    E, k, H, I = 8, 3, 128, 64
    gate, up, down = random_experts(E, H, I, seed=1)
    moe = make_moe(E, k, H, I)
    moe.load_weights_from_tensors(gate, up, down, None)
    x, ids, w = random_routing(6, H, E, k, seed=2)
    ids[0, 0] = -1
    ids[1, 2] = E
    ids[2, 1] = E + 100
    ids[3, :] = -1  # A token with no valid expert gets zeros.
    out = moe.forward(x, ids, w, None)
    ref = reference_moe(x, ids, w, gate, up, down)
    assert torch.all(out[3] == 0)
    check(out, ref)


def test_same_expert_twice_in_a_token():
    E, k, H, I = 8, 2, 128, 64
    gate, up, down = random_experts(E, H, I, seed=3)
    moe = make_moe(E, k, H, I)
    moe.load_weights_from_tensors(gate, up, down, None)
    x, ids, w = random_routing(4, H, E, k, seed=4)
    ids[:, 1] = ids[:, 0]
    out = moe.forward(x, ids, w, None)
    check(out, reference_moe(x, ids, w, gate, up, down))


def test_fewer_slots_than_top_k():
    E, k, H, I = 8, 4, 128, 64
    gate, up, down = random_experts(E, H, I, seed=5)
    moe = make_moe(E, k, H, I)
    moe.load_weights_from_tensors(gate, up, down, None)
    x, ids, w = random_routing(5, H, E, 2, seed=6)
    out = moe.forward(x, ids, w, None)
    check(out, reference_moe(x, ids, w, gate, up, down))


def test_gpu_experts_mask_is_read_at_every_forward():
    E, k, H, I = 8, 4, 128, 64
    gate, up, down = random_experts(E, H, I, seed=7)
    mask = torch.zeros(E, dtype=torch.bool)
    mask[[1, 5]] = True
    moe = make_moe(E, k, H, I, mask=mask)
    moe.load_weights_from_tensors(gate, up, down, None)
    x, ids, w = random_routing(9, H, E, k, seed=8)

    out = moe.forward(x, ids, w, None)
    check(out, reference_moe(x, ids, w, gate, up, down, gpu_experts_mask=mask))
    assert relative_error(out, reference_moe(x, ids, w, gate, up, down)) > 0.05  # Masking did something.

    # Flip bits in place: the very tensor given at construction is read again.
    mask[1] = False
    mask[2] = True
    out2 = moe.forward(x, ids, w, None)
    check(out2, reference_moe(x, ids, w, gate, up, down, gpu_experts_mask=mask))

    mask.zero_()
    check(moe.forward(x, ids, w, None), reference_moe(x, ids, w, gate, up, down))
    mask.fill_(True)
    assert torch.all(moe.forward(x, ids, w, None) == 0)


def test_physical_to_logical_map():
    E, k, H, I = 8, 2, 128, 64
    gate, up, down = random_experts(E, H, I, seed=9)
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(10)).to(torch.int64)
    moe = make_moe(E, k, H, I)
    moe.load_weights_from_tensors(gate, up, down, perm)
    x, ids, w = random_routing(7, H, E, k, seed=11)
    out = moe.forward(x, ids, w, None)
    check(out, reference_moe(x, ids, w, gate, up, down, physical_to_logical=perm))
    # Physical p with the map equals logical map[p] without it.
    plain = make_moe(E, k, H, I)
    plain.load_weights_from_tensors(gate, up, down, None)
    assert torch.equal(out, plain.forward(x, perm[ids].contiguous(), w, None))


def test_replicated_experts_in_map():
    E, k, H, I = 4, 2, 64, 64
    gate, up, down = random_experts(E, H, I, seed=12)
    mapping = torch.tensor([2, 2, 0, 1], dtype=torch.int64)
    moe = make_moe(E, k, H, I)
    moe.load_weights_from_tensors(gate, up, down, mapping)
    x, ids, w = random_routing(5, H, E, k, seed=13)
    check(moe.forward(x, ids, w, None), reference_moe(x, ids, w, gate, up, down, physical_to_logical=mapping))


def test_reload_replaces_weights():
    E, k, H, I = 4, 2, 64, 64
    moe = make_moe(E, k, H, I)
    x, ids, w = random_routing(3, H, E, k, seed=14)
    for seed in (15, 16):
        gate, up, down = random_experts(E, H, I, seed=seed)
        moe.load_weights_from_tensors(gate, up, down, None)
        check(moe.forward(x, ids, w, None), reference_moe(x, ids, w, gate, up, down))


def test_weights_may_be_freed_after_loading():
    E, k, H, I = 4, 2, 64, 64
    gate, up, down = random_experts(E, H, I, seed=17)
    moe = make_moe(E, k, H, I)
    moe.load_weights_from_tensors(gate.clone(), up.clone(), down.clone(), None)
    x, ids, w = random_routing(3, H, E, k, seed=18)
    check(moe.forward(x, ids, w, None), reference_moe(x, ids, w, gate, up, down))


def test_empty_batch_and_max_len():
    E, k, H, I = 4, 2, 64, 64
    gate, up, down = random_experts(E, H, I, seed=19)
    moe = make_moe(E, k, H, I, max_len=16)
    moe.load_weights_from_tensors(gate, up, down, None)
    out = moe.forward(
        torch.empty(0, H, dtype=torch.bfloat16),
        torch.empty(0, k, dtype=torch.int64),
        torch.empty(0, k, dtype=torch.float32),
        None,
    )
    assert out.shape == (0, H) and out.dtype == torch.bfloat16
    x, ids, w = random_routing(16, H, E, k, seed=20)
    check(moe.forward(x, ids, w, None), reference_moe(x, ids, w, gate, up, down))


def test_layers_share_one_growing_pool():
    small = make_moe(4, 2, 64, 64, threads=1)
    pool = _native.current_thread_pool()
    assert pool is not None and pool.num_threads >= 1
    big = make_moe(4, 2, 64, 64, threads=pool.num_threads + 2)
    assert _native.current_thread_pool().num_threads == pool.num_threads + 2
    make_moe(4, 2, 64, 64, threads=1)  # A smaller request keeps the larger pool.
    assert _native.current_thread_pool().num_threads == pool.num_threads + 2
    # Both layers compute on the current pool, with identical results whatever the thread count.
    gate, up, down = random_experts(4, 64, 64, seed=21)
    x, ids, w = random_routing(7, 64, 4, 2, seed=22)
    outs = []
    for moe in (small, big):
        moe.load_weights_from_tensors(gate, up, down, None)
        outs.append(moe.forward(x, ids, w, None))
    check(outs[0], reference_moe(x, ids, w, gate, up, down))
    check(outs[1], reference_moe(x, ids, w, gate, up, down))


def test_concurrent_forwards_from_python_threads():
    # Calls release the GIL and are serialized in C++ (one shared pool, per-layer scratch): results must be
    # exactly those of sequential calls.
    import threading

    E, k, H, I = 8, 2, 128, 64
    layers = []
    for seed in (23, 24):
        gate, up, down = random_experts(E, H, I, seed=seed)
        moe = make_moe(E, k, H, I)
        moe.load_weights_from_tensors(gate, up, down, None)
        layers.append(moe)
    x, ids, w = random_routing(9, H, E, k, seed=25)
    expected = [moe.forward(x, ids, w, None) for moe in layers]
    failures = []

    def worker(i):
        for _ in range(20):
            if not torch.equal(layers[i % 2].forward(x, ids, w, None), expected[i % 2]):
                failures.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_capture_batch_sizes_and_caches():
    KTMoEWrapper.set_capture_batch_sizes([8, 1, 4, 4])
    assert KTMoEWrapper.get_capture_batch_sizes() == [1, 4, 8]
    KTMoEWrapper.clear_buffer_cache()
    KTMoEWrapper.clear_sft_buffer_cache()
    KTMoEWrapper.set_capture_batch_sizes([])
    assert KTMoEWrapper.get_capture_batch_sizes() == []


def test_generate_gpu_experts_masks():
    freq = torch.tensor([[5.0, 1.0, 3.0], [4.0, 9.0, 3.0]])
    masks = kt_kernel.generate_gpu_experts_masks(freq, 3)
    assert masks.dtype == torch.bool
    assert masks.tolist() == [[True, False, False], [True, True, False]]
    assert not kt_kernel.generate_gpu_experts_masks(freq, 0).any()
    with pytest.raises(ValueError, match="num_gpu_experts"):
        kt_kernel.generate_gpu_experts_masks(freq, 7)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
