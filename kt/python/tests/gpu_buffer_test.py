"""submit_write_weight_scale_to_buffer / sync_write_weight_scale_to_buffer: one expert in the GPU MoE kernel's
layout, one host buffer per GPU TP rank (SGLang's GPU prefill of CPU experts).

The reference is the source tensors themselves (the random tensors given to load_weights_from_tensors, or
the checkpoint's tensors read with the numpy reader), sliced as the GPU kernel holds them: with n = I / tp,
rank r's w13 = cat(gate[r n:(r+1) n], up[r n:(r+1) n]) [2n, H], w2 = down[:, r n:(r+1) n] [H, n]; FP8 adds
the weight_scale_inv blocks sliced the same way at 128 granularity. Compared bit for bit.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import testdata
from kt_kernel import KTMoEWrapper
from kt_kernel import serving
from moe_reference import random_experts, wrapper_args
from safetensors_np import SafeTensorsFile

FP8 = getattr(torch, "float8_e4m3fn", None)


def make(E, H, I, method="BF16", **kw):
    return KTMoEWrapper(**wrapper_args(E, 2, H, I, method=method, **kw))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (NaN-safe, dtype-blind equality)."""
    return t.contiguous().view(torch.uint8)


def alloc(tp, shape, dtype, slots=1):
    """One buffer per rank of `slots` experts ([slots, *shape], double buffering as SGLang does it), filled
    with a marker byte so that an unwritten byte shows."""
    out = []
    for _ in range(tp):
        t = torch.empty((slots,) + tuple(shape), dtype=dtype)
        t.view(torch.uint8).fill_(0x5A)
        out.append(t)
    return out


def ptrs(bufs, slot=0):
    return [b[slot].data_ptr() for b in bufs]


def expected_w13(gate, up, e, r, n):
    return torch.cat([gate[e, r * n:(r + 1) * n], up[e, r * n:(r + 1) * n]])


def expected_w2(down, e, r, n):
    return down[e, :, r * n:(r + 1) * n]


def write_bf16(moe, tp, E, H, I, experts):
    """Writes each expert of `experts` into slot (index % 2) of double buffers, as SGLang's pipeline does, and
    yields (expert, slot, w13 bufs, w2 bufs) after each sync."""
    n = I // tp
    w13 = alloc(tp, (2 * n, H), torch.bfloat16, slots=2)
    w2 = alloc(tp, (H, n), torch.bfloat16, slots=2)
    for i, e in enumerate(experts):
        slot = i % 2
        moe.submit_write_weight_scale_to_buffer(tp, e, ptrs(w13, slot), [0] * tp, ptrs(w2, slot), [0] * tp)
        moe.sync_write_weight_scale_to_buffer()
        yield e, slot, w13, w2


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_bf16_random_tensors_bit_exact(tp):
    E, H, I = 6, 96, 64
    moe = make(E, H, I)
    gate, up, down = random_experts(E, H, I, seed=tp)
    moe.load_weights_from_tensors(gate, up, down, None)
    n = I // tp
    for e, slot, w13, w2 in write_bf16(moe, tp, E, H, I, range(E)):
        for r in range(tp):
            assert torch.equal(bits(w13[r][slot]), bits(expected_w13(gate, up, e, r, n))), (e, r)
            assert torch.equal(bits(w2[r][slot]), bits(expected_w2(down, e, r, n))), (e, r)


def test_bf16_expert_id_is_the_physical_slot():
    """With a physical_to_logical map, expert_id i is slot i: logical expert map[i] of the source."""
    E, H, I = 5, 64, 32
    moe = make(E, H, I)
    gate, up, down = random_experts(E, H, I, seed=7)
    p2l = torch.tensor([3, 0, 4, 1, 2], dtype=torch.int64)
    moe.load_weights_from_tensors(gate, up, down, p2l)
    tp, n = 2, I // 2
    for slot_id, _, w13, w2 in write_bf16(moe, tp, E, H, I, range(E)):
        logical = int(p2l[slot_id])
        s = slot_id % 2
        for r in range(tp):
            assert torch.equal(bits(w13[r][s]), bits(expected_w13(gate, up, logical, r, n)))
            assert torch.equal(bits(w2[r][s]), bits(expected_w2(down, logical, r, n)))


def test_several_writes_queued_before_one_sync():
    E, H, I = 4, 64, 32
    moe = make(E, H, I)
    gate, up, down = random_experts(E, H, I, seed=2)
    moe.load_weights_from_tensors(gate, up, down, None)
    tp, n = 2, I // 2
    w13 = alloc(tp, (2 * n, H), torch.bfloat16, slots=E)
    w2 = alloc(tp, (H, n), torch.bfloat16, slots=E)
    for e in range(E):
        moe.submit_write_weight_scale_to_buffer(tp, e, ptrs(w13, e), None, ptrs(w2, e), None)
    moe.sync_write_weight_scale_to_buffer()
    for e in range(E):
        for r in range(tp):
            assert torch.equal(bits(w13[r][e]), bits(expected_w13(gate, up, e, r, n)))
            assert torch.equal(bits(w2[r][e]), bits(expected_w2(down, e, r, n)))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_bf16_checkpoint_bit_exact(tp):
    """deepseek_v3 (bf16) read by load_weights from the folder; the reference is its safetensors tensors."""
    name, layer = "deepseek_v3", 1
    E, _, H, I = testdata.shape(name)
    moe = make(E, H, I, layer_idx=layer, weight_path=testdata.path(name))
    moe.load_weights(torch.arange(E, dtype=torch.int64))
    st = SafeTensorsFile(testdata.path(name) + "/model.safetensors")
    base = f"model.layers.{layer}.mlp.experts."
    gate, up, down = (torch.stack([st.get(f"{base}{e}.{p}.weight") for e in range(E)])
                      for p in ("gate_proj", "up_proj", "down_proj"))
    assert gate.dtype == torch.bfloat16
    n = I // tp
    for e, slot, w13, w2 in write_bf16(moe, tp, E, H, I, range(E)):
        for r in range(tp):
            assert torch.equal(bits(w13[r][slot]), bits(expected_w13(gate, up, e, r, n))), (e, r)
            assert torch.equal(bits(w2[r][slot]), bits(expected_w2(down, e, r, n))), (e, r)


# -- FP8 (block 128) ---------------------------------------------------------------------------------------


def random_fp8(E, H, I, seed):
    """E4M3 codes (all 254 non-NaN codes) and positive fp32 block scales, as a checkpoint ships them."""
    gen = torch.Generator().manual_seed(seed)

    def codes(*shape):
        c = torch.randint(0, 256, shape, generator=gen, dtype=torch.int64)
        c[(c & 0x7F) == 0x7F] = 0x12  # no NaN codes
        return c.to(torch.uint8)

    def scales(*shape):
        return torch.rand(shape, generator=gen, dtype=torch.float32) * 1e-2 + 1e-4

    bi, bh = -(-I // 128), -(-H // 128)
    return (codes(E, I, H), scales(E, bi, bh), codes(E, I, H), scales(E, bi, bh), codes(E, H, I), scales(E, bh, bi))


def write_fp8_and_check(moe, tp, E, H, I, gate, gs, up, us, down, ds, p2l=None):
    n = I // tp
    nb = -(-I // 128) if tp == 1 else n // 128
    hb = -(-H // 128)
    for e in range(E):
        w13 = alloc(tp, (2 * n, H), torch.uint8)
        w2 = alloc(tp, (H, n), torch.uint8)
        s13 = alloc(tp, (2 * nb, hb), torch.float32)
        s2 = alloc(tp, (hb, nb), torch.float32)
        moe.submit_write_weight_scale_to_buffer(tp, e, ptrs(w13), ptrs(s13), ptrs(w2), ptrs(s2))
        moe.sync_write_weight_scale_to_buffer()
        src = e if p2l is None else int(p2l[e])
        for r in range(tp):
            assert torch.equal(w13[r][0], expected_w13(gate, up, src, r, n)), (e, r)
            assert torch.equal(w2[r][0], expected_w2(down, src, r, n)), (e, r)
            want13 = torch.cat([gs[src, r * nb:(r + 1) * nb], us[src, r * nb:(r + 1) * nb]])
            assert torch.equal(bits(s13[r][0]), bits(want13)), (e, r)
            assert torch.equal(bits(s2[r][0]), bits(ds[src, :, r * nb:(r + 1) * nb])), (e, r)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fp8_random_codes_and_scales_bit_exact(tp):
    E, H, I = 3, 200, 512  # H not a multiple of 128: a short last k block
    moe = make(E, H, I, method="FP8")
    gate, gs, up, us, down, ds = random_fp8(E, H, I, seed=tp)
    p2l = torch.tensor([2, 0, 1], dtype=torch.int64)
    moe.load_weights_from_tensors(gate, up, down, p2l, gs, us, ds)
    write_fp8_and_check(moe, tp, E, H, I, gate, gs, up, us, down, ds, p2l)


def test_fp8_tp1_with_a_short_last_block():
    E, H, I = 2, 256, 192  # I = 1.5 blocks: only tp = 1 is valid
    moe = make(E, H, I, method="FP8")
    gate, gs, up, us, down, ds = random_fp8(E, H, I, seed=5)
    moe.load_weights_from_tensors(gate, up, down, None, gs, us, ds)
    write_fp8_and_check(moe, 1, E, H, I, gate, gs, up, us, down, ds)
    with pytest.raises(ValueError, match="not a multiple of the FP8 scale block"):
        moe.submit_write_weight_scale_to_buffer(2, 0, [1, 1], [1, 1], [1, 1], [1, 1])


def test_fp8_checkpoint_bit_exact():
    """deepseek_v3_fp8 as shipped (I = 128: one block, so tp = 1); the reference is its own bytes."""
    name, layer = "deepseek_v3_fp8", 1
    E, _, H, I = testdata.shape(name)
    moe = make(E, H, I, layer_idx=layer, method="FP8", weight_path=testdata.path(name))
    moe.load_weights(None)
    st = SafeTensorsFile(testdata.path(name) + "/model.safetensors")
    base = f"model.layers.{layer}.mlp.experts."

    def codes(t):
        entry = st.header[t]
        begin, end = entry["data_offsets"]
        raw = np.frombuffer(st._data[begin:end].tobytes(), dtype=np.uint8).reshape(entry["shape"])
        return torch.from_numpy(raw.copy())

    src = []
    for p in ("gate_proj", "up_proj", "down_proj"):
        src.append(torch.stack([codes(f"{base}{e}.{p}.weight") for e in range(E)]))
        src.append(torch.stack([st.get(f"{base}{e}.{p}.weight_scale_inv").float() for e in range(E)]))
    gate, gs, up, us, down, ds = src
    write_fp8_and_check(moe, 1, E, H, I, gate, gs, up, us, down, ds)


# -- RAWINT4 (compressed-tensors pack-quantized) --------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2])
def test_rawint4_checkpoint_bit_exact(tp):
    """kimi_k2_rawint4 as shipped: each rank's bytes are the checkpoint's weight_packed rows (column slices of
    down: n / 8 int32 words of each row) and weight_scale bf16 values, bit for bit."""
    name, layer = "kimi_k2_rawint4", 1
    E, _, H, I = testdata.shape(name)
    G, n = 32, I // tp
    moe = make(E, H, I, layer_idx=layer, method="RAWINT4", weight_path=testdata.path(name))
    assert moe.group_size == G
    moe.load_weights(None)
    st = SafeTensorsFile(testdata.path(name) + "/model.safetensors")
    base = f"model.layers.{layer}.mlp.experts."

    def raw(t, dtype):
        entry = st.header[t]
        begin, end = entry["data_offsets"]
        return torch.from_numpy(np.frombuffer(st._data[begin:end].tobytes(), dtype=dtype).reshape(entry["shape"]).copy())

    for e in range(E):
        w13 = alloc(tp, (2 * n, H // 2), torch.uint8)
        s13 = alloc(tp, (2 * n, H // G), torch.int16)
        w2 = alloc(tp, (H, n // 2), torch.uint8)
        s2 = alloc(tp, (H, n // G), torch.int16)
        moe.submit_write_weight_scale_to_buffer(tp, e, ptrs(w13), ptrs(s13), ptrs(w2), ptrs(s2))
        moe.sync_write_weight_scale_to_buffer()
        packed = {p: raw(f"{base}{e}.{p}.weight_packed", np.int32) for p in ("gate_proj", "up_proj", "down_proj")}
        scale = {p: raw(f"{base}{e}.{p}.weight_scale", np.int16) for p in ("gate_proj", "up_proj", "down_proj")}
        for r in range(tp):
            rows = slice(r * n, (r + 1) * n)
            assert torch.equal(w13[r][0], bits(torch.cat([packed["gate_proj"][rows], packed["up_proj"][rows]]))), (e, r)
            assert torch.equal(s13[r][0], torch.cat([scale["gate_proj"][rows], scale["up_proj"][rows]])), (e, r)
            assert torch.equal(w2[r][0], bits(packed["down_proj"][:, r * n // 8:(r + 1) * n // 8])), (e, r)
            assert torch.equal(s2[r][0], scale["down_proj"][:, r * n // G:(r + 1) * n // G]), (e, r)


def test_int4_group_methods_other_than_rawint4_raise_not_implemented():
    E, H, I = 2, 64, 64
    moe = make(E, H, I, method="AMXINT4_KGroup", group_size=32)
    moe.load_weights_from_tensors(*random_experts(E, H, I, seed=1), None)
    with pytest.raises(NotImplementedError, match=r"pack-quantized GPU layout \(bf16 scales\) for method RAWINT4 only"):
        moe.submit_write_weight_scale_to_buffer(1, 0, [1], [1], [1], [1])


# -- methods without a GPU layout, bad inputs ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["AMXINT8", "AMXINT4", "MOE_INT8"])
def test_integer_methods_raise_not_implemented(method):
    E, H, I = 2, 64, 32
    moe = make(E, H, I, method=method)
    moe.load_weights_from_tensors(*random_experts(E, H, I, seed=1), None)
    with pytest.raises(NotImplementedError, match=rf"method '{method}'.*submit_write_weight_scale_to_buffer"):
        moe.submit_write_weight_scale_to_buffer(1, 0, [1], [1], [1], [1])


def test_tensor_parallel_layer_raises_not_implemented():
    E, H, I = 2, 64, 32
    moe = make(E, H, I, threadpool_count=2)
    moe.load_weights_from_tensors(*random_experts(E, H, I, seed=1), None)
    with pytest.raises(NotImplementedError, match=r"threadpool_count=2 tensor-parallel parts"):
        moe.submit_write_weight_scale_to_buffer(1, 0, [1], [0], [1], [0])


def test_bad_inputs_raise_and_write_nothing():
    E, H, I = 4, 64, 32
    moe = make(E, H, I)
    tp, n = 2, I // 2
    w13 = alloc(tp, (2 * n, H), torch.bfloat16)
    w2 = alloc(tp, (H, n), torch.bfloat16)
    good = dict(tp_world_size=tp, expert_id=0, w13_weight_ptrs=ptrs(w13), w13_scale_ptrs=None,
                w2_weight_ptrs=ptrs(w2), w2_scale_ptrs=None)

    with pytest.raises(RuntimeError, match="before the expert weights were loaded"):
        moe.submit_write_weight_scale_to_buffer(**good)
    moe.load_weights_from_tensors(*random_experts(E, H, I, seed=3), None)

    cases = [
        (dict(expert_id=E), ValueError, r"expert_id=4 is not in \[0, num_experts=4\)"),
        (dict(expert_id=-1), ValueError, "expert_id=-1"),
        (dict(expert_id=1.0), TypeError, "expert_id must be an int"),
        (dict(tp_world_size=3), ValueError, "tp_world_size=3 must be >= 1 and divide moe_intermediate_size=32"),
        (dict(tp_world_size=0), ValueError, "tp_world_size=0"),
        (dict(w13_weight_ptrs=ptrs(w13)[:1]), ValueError, "w13_weight_ptrs has 1 addresses; expected one per GPU"),
        (dict(w2_weight_ptrs=ptrs(w2) + [1]), ValueError, "w2_weight_ptrs has 3 addresses"),
        (dict(w2_weight_ptrs=[ptrs(w2)[0], 0]), ValueError, r"w2_weight_ptrs\[1\] = 0 is not a valid address"),
        (dict(w13_weight_ptrs=w13[0]), ValueError, "w13_weight_ptrs has"),
        (dict(w13_weight_ptrs=[float(p) for p in ptrs(w13)]), TypeError, r"w13_weight_ptrs\[0\] must be an int"),
        (dict(w13_weight_ptrs=12345), TypeError, "w13_weight_ptrs must be a list of ints"),
    ]
    before = [bits(b).clone() for b in w13 + w2]
    for change, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            moe.submit_write_weight_scale_to_buffer(**{**good, **change})
    moe.sync_write_weight_scale_to_buffer()
    assert all(torch.equal(bits(b), was) for b, was in zip(w13 + w2, before)), "a rejected call wrote"
    # FP8 needs its scale lists.
    f = make(E, H, 256, method="FP8")
    gate, gs, up, us, down, ds = random_fp8(E, H, 256, seed=1)
    f.load_weights_from_tensors(gate, up, down, None, gs, us, ds)
    with pytest.raises(ValueError, match="w13_scale_ptrs has 0 addresses"):
        f.submit_write_weight_scale_to_buffer(2, 0, [1, 1], [], [1, 1], [1, 1])
    with pytest.raises(TypeError, match="w2_scale_ptrs must be a list"):
        f.submit_write_weight_scale_to_buffer(2, 0, [1, 1], [1, 1], [1, 1], None)


def test_cpp_checks_too():
    """The C++ task checks its arguments itself (ValueError naming them), for callers below kt_kernel."""
    from kt_kernel import _native

    E, H, I = 2, 64, 32
    moe = make(E, H, I)
    moe.load_weights_from_tensors(*random_experts(E, H, I, seed=3), None)
    with pytest.raises(ValueError, match=r"expert_id = 2 is not in \[0, num_experts = 2\)"):
        _native._kt.GpuExpertWrite(moe._moe.address, moe._pool(), 1, 2, [1], [], [1], [])
    with pytest.raises(ValueError, match=r"w2_weight_ptrs has 1 addresses.*tp_world_size = 2"):
        _native._kt.GpuExpertWrite(moe._moe.address, moe._pool(), 2, 0, [1, 1], [], [1], [])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
