"""KTMoEWrapper(mode="sft") against PyTorch autograd of the same computation (float64).

Tolerance: relative L2 error ||kt - torch|| / ||torch|| <= 1e-2 for the BF16 base on the output, grad_input,
grad_weights and every LoRA gradient (issue 5). kt rounds h = silu(g)u, the cached y, grad_y, grad_g and
grad_u to bf16 (2^-9 relative each) and returns bf16, so the expected error is a few 1e-3. For the INT8
base the format's own error dominates (int8 weights and activations, transposed weights quantized again
for backward); it is printed and held to 0.12, the low end of what the original kt-kernel accepts
(0.12-0.18) for its INT8/INT4 SFT tests.

INT4 bases (AMXINT4_SFT, AMXINT4_1_SFT, AMXINT4_KGroup_SFT, AMXINT4_1KGroup_SFT and their _SkipLoRA
variants) are compared against the same unquantized float64 reference, so the error printed is the int4
format's own: 16 levels per channel or group (a step of absmax/7 for the symmetric formats, range/15 with a
zero point) give ~0.1 relative L2 per weight matrix, applied once in forward and, on a second
quantization of the transposed weights, once more in backward; the activations' int8 rounding adds ~1%.
INT4_TOL (see its comment) holds them at the original's accepted 0.12-0.18 band's upper end plus the
second quantization, and still fails a missing or wrong term (O(1) relative).
"""

from __future__ import annotations

import sys

import pytest
import torch

from kt_kernel import KTMoEWrapper
from moe_reference import wrapper_args

# H and I multiples of 32 so that the KGroup methods run with group_size 32 (3 and 2 groups per row).
E, K, H, I, R = 8, 3, 96, 64, 8
ALPHA = 16.0  # s = 2
QLEN = 37


def make(method="AMXBF16_SFT", depth=1, **overrides):
    kwargs = wrapper_args(E, K, H, I, method=method, mode="sft", lora_rank=R, lora_alpha=ALPHA, max_cache_depth=depth)
    kwargs.update(overrides)
    return KTMoEWrapper(**kwargs)


def base_weights(seed):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(E, I, H, generator=g) / H**0.5).bfloat16()
    up = (torch.randn(E, I, H, generator=g) / H**0.5).bfloat16()
    down = (torch.randn(E, H, I, generator=g) / I**0.5).bfloat16()
    return gate, up, down


def lora_weights(seed):
    """A and B both random (PEFT initializes B to 0, which would leave the A gradients 0 and untested)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(E, R, H), (E, I, R), (E, R, H), (E, I, R), (E, R, I), (E, H, R)]
    fan_in = [H, R, H, R, I, R]
    weights = [(0.5 * torch.randn(*s, generator=g) / f**0.5).bfloat16() for s, f in zip(shapes, fan_in)]
    grads = [torch.full(s, 7.0, dtype=torch.bfloat16) for s in shapes]  # garbage to be overwritten
    return weights, grads


def batch(seed, qlen=QLEN):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(qlen, H, generator=g).bfloat16()
    ids = torch.randint(0, E - 1, (qlen, K), generator=g)  # expert E-1 never routed
    ids[2, 1] = -1  # a skipped slot
    w = torch.rand(qlen, K, generator=g) * 0.9 + 0.1
    gout = torch.randn(qlen, H, generator=g).bfloat16()
    return x, ids, w, gout


def torch_reference(base, lora, x, ids, w, gout, rank=R, alpha=ALPHA):
    """Autograd in float64 of g = W_g x + s B_g A_g x, u likewise, h = silu(g) u, y = W_d h + s B_d A_d h,
    out = sum_j w_j y_j. Returns out and the gradients (input, weights, six LoRA)."""
    s = alpha / rank if lora is not None else 0.0
    gate, up, down = (t.double() for t in base)
    xd = x.double().requires_grad_()
    wd = w.double().requires_grad_()
    params = [t.double().requires_grad_() for t in lora] if lora is not None else None
    out = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for e in range(E):
        for j in range(ids.shape[1]):
            idx = (ids[:, j] == e).nonzero().flatten()
            if idx.numel() == 0:
                continue
            xe = xd[idx]
            g = xe @ gate[e].T
            u = xe @ up[e].T
            if params is not None:
                ag, bg, au, bu, ad, bd = params
                g = g + s * (xe @ ag[e].T) @ bg[e].T
                u = u + s * (xe @ au[e].T) @ bu[e].T
            h = torch.nn.functional.silu(g) * u
            y = h @ down[e].T
            if params is not None:
                y = y + s * (h @ ad[e].T) @ bd[e].T
            out = out.index_add(0, idx, wd[idx, j : j + 1] * y)
    out.backward(gout.double())
    grads = {"grad_input": xd.grad, "grad_weights": wd.grad}
    if params is not None:
        for name, p in zip(["gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b"], params):
            grads[name] = p.grad
    return out.detach(), grads


def rel_l2(got, want):
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm())


def build(method="AMXBF16_SFT", depth=1, seed=1, **kw):
    moe = make(method, depth, **kw)
    base = base_weights(seed)
    moe.load_weights_from_tensors(*base, None)
    lora, grads = lora_weights(seed + 100)
    if not method.endswith("_SkipLoRA"):
        moe.init_lora_weights(*lora, *grads)
    return moe, base, lora, grads


def compare(label, moe, out, gi, gw, grads, ref_out, ref, tol):
    errs = {"output": rel_l2(out, ref_out), "grad_input": rel_l2(gi, ref["grad_input"])}
    # Skipped slots get 0 in both.
    errs["grad_weights"] = rel_l2(gw, ref["grad_weights"])
    if grads is not None:
        for name, g in zip(["gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b"], grads):
            errs[f"{name.replace('_', '_lora_')}"] = rel_l2(g, ref[name])
    worst = max(errs.values())
    print(f"{label} [{moe.method} on {moe.isa}] rel L2: " + ", ".join(f"{k}={v:.4f}" for k, v in errs.items()))
    for name, err in errs.items():
        assert err <= tol, f"{label}: {name} relative L2 error {err:.4f} > {tol}"
    return worst


# INT4 bases against the unquantized reference. Measured on the dev box (avx2): relative L2 0.10-0.22 with
# LoRA, 0.14-0.25 SkipLoRA (LoRA's unquantized terms dilute the base's error); the worst is grad_input,
# which passes both quantizations (forward W per output channel, backward W^T per input channel).
# 0.35 = worst x 1.4 for other seeds and paths; a missing or wrong term is O(1). The original accepts
# 0.12-0.18 for its INT4 SFT tests (its int4 formats' errors at its shapes); kt's are in that band
# for most tensors and above it only where the second (backward) quantization adds in.
INT4_TOL = 0.35

INT4_METHODS = [
    ("AMXINT4_SFT", {}),
    ("AMXINT4_1_SFT", {}),
    ("AMXINT4_KGroup_SFT", {"group_size": 32}),
    ("AMXINT4_1KGroup_SFT", {"group_size": 32}),
]


@pytest.mark.parametrize(
    "method,tol,kw",
    [("AMXBF16_SFT", 1e-2, {}), ("AMXINT8_SFT", 0.12, {})] + [(m, INT4_TOL, kw) for m, kw in INT4_METHODS],
)
def test_forward_backward_match_torch_autograd(method, tol, kw):
    moe, base, lora, grads = build(method, **kw)
    x, ids, w, gout = batch(2)
    out = moe.forward(x, ids, w, save_for_backward=True)
    gi, gw = moe.backward(gout)
    assert gi.dtype == torch.bfloat16 and gi.shape == (QLEN, H)
    assert gw.dtype == torch.float32 and gw.shape == (QLEN, K)
    ref_out, ref = torch_reference(base, lora, x, ids, w, gout)
    compare("fwd+bwd", moe, out, gi, gw, grads, ref_out, ref, tol)
    assert float(gw[2, 1]) == 0.0
    # The never-routed expert's gradients are zeros (the 7.0 garbage was overwritten).
    assert all(bool((g[E - 1] == 0).all()) for g in grads)


def backward_lifo(tag, moe, base, lora, grads, first, second):
    """Backward of two cached forwards, newest first, each against torch autograd of its own batch."""
    for name, (b, out) in (("2nd", second), ("1st", first)):
        gi, gw = moe.backward(b[3])
        ref_out, ref = torch_reference(base, lora, *b)
        compare(f"{tag} {name}", moe, out, gi, gw, grads, ref_out, ref, 1e-2)


def test_cache_depth_two_forwards_two_backwards_lifo():
    moe, base, lora, grads = build(depth=2)
    b1, b2 = batch(3), batch(4, qlen=21)
    out1 = moe.forward(*b1[:3])
    out2 = moe.forward(*b2[:3])
    assert moe.cache_depth == 2
    with pytest.raises(RuntimeError, match="max_cache_depth=2"):
        moe.forward(*b1[:3])
    moe.forward(*b1[:3], save_for_backward=False)  # not cached: always allowed
    with pytest.raises(ValueError, match=r"grad_output must have shape \[qlen, hidden_size\] = \[21, 96\]"):
        moe.backward(b1[3])  # the newest cached forward is b2's (21 tokens)
    backward_lifo("lifo", moe, base, lora, grads, (b1, out1), (b2, out2))
    assert moe.cache_depth == 0
    with pytest.raises(RuntimeError, match="backward without a cached forward"):
        moe.backward(b1[3])


@pytest.mark.parametrize(
    "method,tol,kw",
    [("AMXBF16_SFT_SkipLoRA", 1e-2, {}), ("AMXINT8_SFT_SkipLoRA", 0.12, {})]
    + [(m + "_SkipLoRA", INT4_TOL, kw) for m, kw in INT4_METHODS],
)
def test_skip_lora(method, tol, kw):
    moe, base, _, _ = build(method, **kw)
    x, ids, w, gout = batch(5)
    out = moe.forward(x, ids, w)
    gi, gw = moe.backward(gout)
    ref_out, ref = torch_reference(base, None, x, ids, w, gout)
    compare("skip_lora", moe, out, gi, gw, None, ref_out, ref, tol)


@pytest.mark.parametrize(
    "method,expected",
    [
        ("AMXINT4_SFT", "int4"),
        ("AMXINT4_1_SFT", "int4_asym"),
        ("AMXINT4_KGroup_SFT", "int4_group_sym"),
        ("AMXINT4_1KGroup_SFT", "int4_group_asym"),
        ("AMXINT4_1KGroup_SFT_SkipLoRA", "int4_group_asym"),
    ],
)
def test_int4_methods_map_to_formats(method, expected):
    moe = make(method, group_size=32)
    assert moe.weight_format == expected
    # int4 packs two weights a byte: the forward copy is about a quarter of bf16's (plus scales).
    moe.load_weights_from_tensors(*base_weights(1), None)
    mem = moe.memory_bytes()
    assert mem["weights"] < 3 * E * H * I * 2 // 3
    assert mem["backward_weights"] < 3 * E * H * I * 2 // 3


def test_int4_group_size_errors():
    # The default group_size 128 does not divide H = 96: a clear error naming the field and the value.
    with pytest.raises(ValueError, match="must be a multiple of group_size = 128"):
        make("AMXINT4_KGroup_SFT")
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128"):
        make("AMXINT4_1KGroup_SFT", group_size=48)


def test_int4_group_shared_backward_weights_keyed_by_group_size():
    # Layers of one shape but different group sizes need different transposed copies: the shared-buffer
    # key includes group_size, else the second layer would be handed the first's copy and SftMoeLayer
    # would refuse it ("shared backward weights are for ... group_size 32").
    from kt_kernel.sft.amx import AMXSFTMoEWrapper

    def layer(gs, idx):
        return AMXSFTMoEWrapper(
            layer_idx=idx, num_experts=E, num_experts_per_tok=K, hidden_size=H * 2, moe_intermediate_size=I * 2,
            num_gpu_experts=0, cpuinfer_threads=2, threadpool_count=1, weight_path=None,
            chunked_prefill_size=64, lora_rank=R, lora_alpha=ALPHA, max_cache_depth=1,
            method="AMXINT4_KGroup_SFT", group_size=gs, share_backward_bb=True,
        )

    a, b = layer(32, 0), layer(64, 1)
    assert a.group_size == 32 and b.group_size == 64 and b.weight_format == "int4_group_sym"


def test_optimizer_updates_in_place_are_seen_and_accumulate_scale():
    moe, base, lora, grads = build(depth=2)
    x, ids, w, gout = batch(6)
    with torch.no_grad():
        for t in lora:
            t.mul_(1.5)  # an optimizer step in place
    out = moe.forward(x, ids, w)
    moe.forward(x, ids, w)
    moe.backward(gout, optimizer_grad_scale=0.5)
    gi, gw = moe.backward(gout, optimizer_grad_scale=0.5, accumulate_optimizer_grads=True)
    ref_out, ref = torch_reference(base, lora, x, ids, w, gout)
    compare("in-place+accumulate", moe, out, gi, gw, grads, ref_out, ref, 1e-2)


def test_share_backward_bb_two_layers():
    from kt_kernel.sft.amx import AMXSFTMoEWrapper

    def layer(seed, idx):
        moe = AMXSFTMoEWrapper(
            layer_idx=idx, num_experts=E, num_experts_per_tok=K, hidden_size=H, moe_intermediate_size=I,
            num_gpu_experts=0, cpuinfer_threads=2, threadpool_count=1, weight_path=None,
            chunked_prefill_size=64, lora_rank=R, lora_alpha=ALPHA, max_cache_depth=1,
            method="AMXBF16_SFT", share_backward_bb=True,
        )
        base = base_weights(seed)
        moe.load_weights_from_tensors(*base, None)
        lora, grads = lora_weights(seed + 100)
        moe.init_lora_weights(*lora, *grads)
        return moe, base, lora, grads

    l1, l2 = layer(10, 0), layer(11, 1)
    b1, b2 = batch(12), batch(13)
    o1 = l1[0].forward(*b1[:3])
    o2 = l2[0].forward(*b2[:3])
    r2 = l2[0].backward(b2[3])
    r1 = l1[0].backward(b1[3])
    for (moe, base, lora, grads), out, (gi, gw), b in ((l1, o1, r1, b1), (l2, o2, r2, b2)):
        ref_out, ref = torch_reference(base, lora, *b)
        compare("shared bwd", moe, out, gi, gw, grads, ref_out, ref, 1e-2)
    mem = l1[0].memory_bytes()
    # The transposed bf16 copy holds as many bytes as the forward weights (H and I are multiples of 16,
    # so neither packing pads): 3 E H I bf16 values.
    assert mem["backward_weights"] == mem["weights"] == 3 * E * H * I * 2


def _pooled_pair(depth=1, share=True, seeds=(30, 31)):
    """Layers 0 and 1 built through KTMoEWrapper, sharing one cache pool when ``share``."""
    layers = []
    for idx, seed in enumerate(seeds):
        moe, base, lora, grads = build(depth=depth, seed=seed, layer_idx=idx, share_cache_pool=share)
        layers.append((moe, base, lora, grads))
    return layers


def test_share_cache_pool_recompute_matches_per_layer_caches():
    # Activation recomputation over two layers: the no-grad forward of each, then per layer in backward
    # order (1, then 0) its recompute forward and its backward. The pool only moves buffers between the
    # layers, so the results equal the per-layer caches' bit for bit (those are checked against torch
    # here and in the other tests), and the pool holds one layer's cache bytes instead of two.
    KTMoEWrapper.clear_sft_buffer_cache()  # a fresh pool, whatever earlier tests left in the process
    plain, pooled = _pooled_pair(share=False), _pooled_pair(share=True)
    b = (batch(32), batch(33))  # same qlen: both layers' caches are of one size
    results = {}
    for name, layers in (("plain", plain), ("pooled", pooled)):
        for (moe, *_), bt in zip(layers, b):
            with torch.no_grad():
                moe.forward(*bt[:3], save_for_backward=False)
        res = []
        for idx in (1, 0):
            moe = layers[idx][0]
            out = moe.forward(*b[idx][:3], save_for_backward=True)
            gi, gw = moe.backward(b[idx][3])
            res.append((idx, out, gi, gw, [g.clone() for g in layers[idx][3]]))
        results[name] = res
    for (idx, *p), (_, *q) in zip(results["plain"], results["pooled"]):
        for name, x, y in zip(("output", "grad_input", "grad_weights"), p[:3], q[:3]):
            assert torch.equal(x, y), f"layer {idx}: {name} differs with share_cache_pool"
        for x, y in zip(p[3], q[3]):
            assert torch.equal(x, y), f"layer {idx}: a LoRA gradient differs with share_cache_pool"
    idx, out, gi, gw, grads = results["pooled"][1]  # layer 0 against torch too
    ref_out, ref = torch_reference(pooled[0][1], pooled[0][2], *b[0])
    compare("share_cache_pool", pooled[0][0], out, gi, gw, grads, ref_out, ref, 1e-2)
    mem_plain = [m.memory_bytes() for m, *_ in plain]
    mem_pooled = [m.memory_bytes() for m, *_ in pooled]
    assert mem_plain[0]["cache"] == mem_plain[1]["cache"] > 0 and mem_plain[0]["cache_pool"] == 0
    # The pooled layers own no cache; the pool is one object, counted once: one layer's bytes.
    assert [m["cache"] for m in mem_pooled] == [0, 0]
    assert mem_pooled[0]["cache_pool"] == mem_pooled[1]["cache_pool"] == mem_plain[0]["cache"]


def test_share_cache_pool_full_is_clear_and_loses_nothing():
    KTMoEWrapper.clear_sft_buffer_cache()
    (l0, base0, lora0, grads0), (l1, base1, lora1, grads1) = _pooled_pair(seeds=(34, 35))
    b0, b1 = batch(36), batch(37, qlen=19)
    out1 = l1.forward(*b1[:3])
    with pytest.raises(RuntimeError, match=r"on layer 0: the shared cache pool \(share_cache_pool\) is full.*"
                       r"layer 1 holds 1.*per-layer caches"):
        l0.forward(*b0[:3])
    assert l0.cache_depth == 0 and l1.cache_depth == 1
    l0.forward(*b0[:3], save_for_backward=False)  # not cached: allowed, and leaves layer 1's cache alone
    gi1, gw1 = l1.backward(b1[3])
    ref_out1, ref1 = torch_reference(base1, lora1, *b1)
    compare("pool full, l1", l1, out1, gi1, gw1, grads1, ref_out1, ref1, 1e-2)
    out0 = l0.forward(*b0[:3])
    gi0, gw0 = l0.backward(b0[3])
    ref_out0, ref0 = torch_reference(base0, lora0, *b0)
    compare("pool full, l0", l0, out0, gi0, gw0, grads0, ref_out0, ref0, 1e-2)
    with pytest.raises(RuntimeError, match="backward without a cached forward"):
        l0.backward(b0[3])


def test_share_cache_pool_depth_two_lifo():
    KTMoEWrapper.clear_sft_buffer_cache()
    moe, base, lora, grads = build(depth=2, seed=38, share_cache_pool=True)
    b1, b2 = batch(39), batch(40, qlen=23)
    out1 = moe.forward(*b1[:3])
    out2 = moe.forward(*b2[:3])
    backward_lifo("pool lifo", moe, base, lora, grads, (b1, out1), (b2, out2))
    # A depth-1 wrapper of the same shape gets its own pool (the key includes max_cache_depth), so it
    # can cache while this one's pool is in use.
    other, *_ = build(depth=1, seed=41, share_cache_pool=True)
    moe.forward(*b1[:3])
    other.forward(*b1[:3])
    assert other.memory_bytes()["cache_pool"] > 0
    other.backward(b1[3])
    moe.backward(b1[3])


def test_share_cache_pool_type_checked():
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match="share_cache_pool must be a bool"):
            make(share_cache_pool=bad)
    assert make(share_cache_pool=False).share_cache_pool is False


def test_validation_errors():
    moe = make()
    x, ids, w, gout = batch(7)
    with pytest.raises(RuntimeError, match="before the base weights were loaded"):
        moe.forward(x, ids, w)
    moe.load_weights_from_tensors(*base_weights(1), None)
    with pytest.raises(RuntimeError, match="before init_lora_weights"):
        moe.forward(x, ids, w)
    lora, grads = lora_weights(2)
    bad = list(lora)
    bad[1] = bad[1].float()
    with pytest.raises(TypeError, match="gate_lora_b must have dtype torch.bfloat16"):
        moe.init_lora_weights(*bad, *grads)
    bad = list(grads)
    bad[5] = torch.zeros(E, H, R + 1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"grad_down_lora_b must have shape \[E, H, r\] = \[8, 96, 8\]"):
        moe.init_lora_weights(*lora, *bad)
    with pytest.raises(ValueError, match="grad_up_lora_a must not share memory"):
        moe.init_lora_weights(*lora, *grads[:2], lora[2], *grads[3:])
    moe.init_lora_weights(*lora, *grads)
    with pytest.raises(RuntimeError, match="backward without a cached forward"):
        moe.backward(gout)
    with pytest.raises(TypeError, match="expert_ids must have dtype torch.int64"):
        moe.forward(x, ids.int(), w)
    with pytest.raises(ValueError, match="chunked_prefill_size=64"):
        moe.forward(torch.zeros(65, H, dtype=torch.bfloat16), torch.zeros(65, K, dtype=torch.int64),
                    torch.zeros(65, K))
    with pytest.raises(NotImplementedError, match="num_gpu_experts=2"):
        make(num_gpu_experts=2)


def test_qlen_zero_gives_empty_output_and_zero_lora_gradients():
    """As inference does, an empty batch is a valid call: empty output and gradients, LoRA gradients 0
    (every expert got no token), unchanged when accumulating; the cache stack stays LIFO around it."""
    moe, base, lora, grads = build(depth=2)
    x, ids, w, gout = batch(3)
    out = moe.forward(x, ids, w, save_for_backward=True)
    empty = moe.forward(torch.empty(0, H, dtype=torch.bfloat16), torch.empty(0, K, dtype=torch.int64),
                        torch.empty(0, K, dtype=torch.float32), save_for_backward=True)
    assert empty.shape == (0, H) and empty.dtype == torch.bfloat16
    gi, gw = moe.backward(torch.empty(0, H, dtype=torch.bfloat16))
    assert gi.shape == (0, H) and gw.shape == (0, K)
    assert all(bool((g == 0).all()) for g in grads)
    # The real forward's backward still comes next and matches autograd.
    gi, gw = moe.backward(gout)
    ref_out, ref = torch_reference(base, lora, x, ids, w, gout)
    assert rel_l2(gi, ref["grad_input"]) <= 1e-2
    # Accumulating over an empty batch leaves the gradients as they are.
    before = [g.clone() for g in grads]
    moe.forward(torch.empty(0, H, dtype=torch.bfloat16), torch.empty(0, K, dtype=torch.int64),
                torch.empty(0, K, dtype=torch.float32), save_for_backward=True)
    moe.backward(torch.empty(0, H, dtype=torch.bfloat16), accumulate_optimizer_grads=True)
    assert all(torch.equal(a, b) for a, b in zip(before, grads))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))
