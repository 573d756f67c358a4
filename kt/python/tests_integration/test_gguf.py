"""Method LLAMAFILE against the ``gguf`` package (PyPI), the independent oracle of ggml's block formats.

Each case writes a small GGUF checkpoint with ``gguf.GGUFWriter`` (expert-stacked ``blk.L.ffn_*_exps.weight``,
one layer): the 32-value types and the float types quantized by ``gguf.quants.quantize`` from random float
weights, the K-quants (which ``gguf`` dequantizes but cannot quantize) as random blocks with sane fp16
factors. kt's ``KTMoEWrapper(method="LLAMAFILE", weight_path=...)`` runs the layer; the reference is a
float64 MoE over the weights ``gguf.quants.dequantize`` gives, with unquantized activations.

The difference between the two is then only what ggml's dot adds on purpose: the activations quantized to
the type's dot partner (x per block of B = 32 values, Q8_0, for Q4_0..Q8_0; B = 256, Q8_K, for the K-quants;
none for BF16/F16/F32; d = max|x_block| / 127), and h rounded to bf16 then quantized for the down product
(B of the down type), and the output rounded to bf16. The test bounds it per element from the data
(docs/FORMATS.md, "LLAMAFILE: error bound"): a quantization error is uniform in [-d/2, d/2] (variance
d^2 / 12), independent between elements; to first order the output moves by C dx, with
C = sum_j w_j Wd_e (diag(silu'(g) u) Wg_e + diag(silu(g)) Wu_e) over the token's experts (one dx, shared by
them), plus sum_j w_j Wd_e dh for h's own rounding (bf16: |dh| <= 2^-8 |h|, variance (2^-8 h)^2 / 3) and
quantization (d_h^2 / 12). With sigma^2 the sum of those variances, the bound is
    6 sigma + 2^-8 |ref| (the output's bf16 rounding) + 1e-5 sum |Wd| |h| (fp32 sums).
A sum of >= 256 independent bounded terms is close to Gaussian: 6 sigma is exceeded with probability
about 2e-9 per element. The tests print how much of the bound the worst element uses (0.3 to 0.7 here); a
wrong block decode moves outputs by many sigma: ``test_bound_catches_wrong_blocks`` checks that the bound
rejects a layer whose blocks are other ones of the same types.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

import kt_kernel  # noqa: E402
from kt_kernel import KTMoEWrapper  # noqa: E402

E, H, I, TOPK, LAYER = 4, 256, 512, 2, 1

# Per ggml type: its Q8 partner's block (0: float, no activation quantization) and offsets of the fp16
# factors in a block (K-quants, written at random here).
PARTNER = {T.Q4_0: 32, T.Q4_1: 32, T.Q5_0: 32, T.Q5_1: 32, T.Q8_0: 32, T.Q2_K: 256, T.Q3_K: 256, T.Q4_K: 256,
           T.Q5_K: 256, T.Q6_K: 256, T.BF16: 0, T.F16: 0, T.F32: 0}
K_HALVES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}

CASES = [  # (gate and up, down): every supported type at least once, mixed as real files mix them
    (T.Q4_0, T.Q8_0),
    (T.Q4_1, T.Q5_1),
    (T.Q5_0, T.Q5_0),
    (T.Q8_0, T.Q4_0),
    (T.Q2_K, T.Q3_K),
    (T.Q4_K, T.Q6_K),
    (T.Q5_K, T.Q4_K),
    (T.BF16, T.F16),
    (T.F32, T.BF16),
]


def _blocks(qtype, rows, k, rng):
    """[rows, k] of qtype as ggml bytes: quantized by gguf where it can, else random blocks."""
    if qtype in K_HALVES:
        bsize, tsize = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(rows, k // bsize, tsize), dtype=np.uint8)
        for off in K_HALVES[qtype]:
            d = (rng.uniform(2e-4, 2e-3, size=(rows, k // bsize)) * rng.choice([-1, 1], size=(rows, k // bsize)))
            raw[:, :, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(rows, k // bsize, 2)
        return raw.reshape(rows, -1)
    w = rng.normal(0, 0.05, size=(rows, k)).astype(np.float32)
    return gguf.quants.quantize(w, qtype)


def _write(path, gate_up, down, seed=0, layer=LAYER, experts=E):
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "qwen3moe")
    weights = {}
    for proj, qtype, n, k in (("gate", gate_up, I, H), ("up", gate_up, I, H), ("down", down, H, I)):
        data = _blocks(qtype, experts * n, k, rng)
        data = data.reshape(experts, n, *data.shape[1:])
        writer.add_tensor(f"blk.{layer}.ffn_{proj}_exps.weight", data, raw_dtype=qtype)
        weights[proj] = gguf.quants.dequantize(data, qtype).astype(np.float64).reshape(experts, n, k)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def _bf16(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(torch.bfloat16).to(torch.float64).numpy()


def _q8_step(x, block):
    """The Q8 quantization step d = max|x_block| / 127 of every element of x (blocks along the last axis)."""
    if block == 0:
        return np.zeros_like(x)
    d = np.abs(x.reshape(*x.shape[:-1], -1, block)).max(axis=-1, keepdims=True) / 127.0
    return np.broadcast_to(d, (*x.shape[:-1], x.shape[-1] // block, block)).reshape(x.shape)


def _reference_and_bound(w, x, ids, topw, gate_up, down):
    def silu(g):
        return g / (1.0 + np.exp(-g))

    def dsilu(g):
        s = 1.0 / (1.0 + np.exp(-g))
        return s * (1.0 + g * (1.0 - s))

    ref = np.zeros((x.shape[0], H))
    bound = np.zeros((x.shape[0], H))
    for t in range(x.shape[0]):
        var_x = _q8_step(x[t], PARTNER[gate_up]) ** 2 / 12.0
        c = np.zeros((H, H))
        var_h = np.zeros(H)
        mag = np.zeros(H)
        for j in range(TOPK):
            e, wt = ids[t, j], topw[t, j]
            g, u = w["gate"][e] @ x[t], w["up"][e] @ x[t]
            h = silu(g) * u
            c += wt * (w["down"][e] @ ((dsilu(g) * u)[:, None] * w["gate"][e] + silu(g)[:, None] * w["up"][e]))
            hb = _bf16(h)
            var_dh = (2.0**-8 * np.abs(h)) ** 2 / 3.0 + _q8_step(hb, PARTNER[down]) ** 2 / 12.0
            var_h += wt**2 * (w["down"][e] ** 2 @ var_dh)
            ref[t] += wt * (w["down"][e] @ h)
            mag += wt * (np.abs(w["down"][e]) @ np.abs(h))
        sigma = np.sqrt(c**2 @ var_x + var_h)
        bound[t] = 6.0 * sigma + 2.0**-8 * np.abs(ref[t]) + 1e-5 * mag
    return ref, bound


def _routing(T_, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T_, H, generator=g) * 0.5).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(T_)]).to(torch.int64)
    topw = torch.rand(T_, TOPK, generator=g).to(torch.float32)
    return x, ids, topw


def _layer(path, **kw):
    args = dict(layer_idx=LAYER, num_experts=E, num_experts_per_tok=TOPK, hidden_size=H, moe_intermediate_size=I,
                gpu_experts_mask=None, cpuinfer_threads=2, threadpool_count=1, weight_path=path,
                chunked_prefill_size=16, method="LLAMAFILE")
    args.update(kw)
    return KTMoEWrapper(**args)


@pytest.mark.parametrize("gate_up,down", CASES, ids=[f"{a.name}-{b.name}" for a, b in CASES])
def test_gguf_layer_matches_dequantized_reference(tmp_path, gate_up, down):
    path = str(tmp_path / "model.gguf")
    w = _write(path, gate_up, down, seed=int(gate_up) * 7 + int(down))
    moe = _layer(path)
    assert moe.gguf_types == (gate_up.name, gate_up.name, down.name)
    assert moe.weight_format == ("gguf_float" if PARTNER[gate_up] == 0 else "gguf")
    moe.load_weights()
    for T_, seed in ((1, 3), (9, 4)):  # decode and a short prefill
        x, ids, topw = _routing(T_, seed)
        out = moe.forward(x, ids, topw).to(torch.float64).numpy()
        ref, bound = _reference_and_bound(w, x.to(torch.float64).numpy(), ids.numpy(), topw.to(torch.float64).numpy(),
                                          gate_up, down)
        err = np.abs(out - ref)
        used = float((err / bound).max())
        print(f"{gate_up.name}/{down.name} T={T_} ({kt_kernel.__cpu_variant__}): max err {err.max():.3g}, "
              f"max|ref| {np.abs(ref).max():.3g}, bound used {used:.2f}")
        assert np.all(err <= bound), f"{gate_up.name}/{down.name}: error above the bound ({used:.2f} of it)"


def test_bound_catches_wrong_blocks(tmp_path):
    # The reference of one file against kt on another file of the same types (other random blocks): the
    # bound must reject it, so a decode error of that size could not pass.
    a, b = str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")
    w = _write(a, T.Q4_K, T.Q6_K, seed=1)
    _write(b, T.Q4_K, T.Q6_K, seed=2)
    moe = _layer(b)
    moe.load_weights()
    x, ids, topw = _routing(4, 5)
    out = moe.forward(x, ids, topw).to(torch.float64).numpy()
    ref, bound = _reference_and_bound(w, x.to(torch.float64).numpy(), ids.numpy(), topw.to(torch.float64).numpy(),
                                      T.Q4_K, T.Q6_K)
    assert np.mean(np.abs(out - ref) > bound) > 0.5


def test_errors_name_tensor_dimension_and_types(tmp_path):
    path = str(tmp_path / "m.gguf")
    _write(path, T.Q4_K, T.Q6_K)
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_gate_exps\.weight: ne\[0\] \(hidden_size\) = 256, the layer "
                                         r"has hidden_size = 512"):
        _layer(path, hidden_size=512)
    with pytest.raises(ValueError, match=r"ne\[2\] \(num_experts\) = 4, the layer has num_experts = 6: experts "
                                         r"4\.\.5 of layer 1 are missing"):
        _layer(path, num_experts=6)
    with pytest.raises(OSError, match=r"layer 0 has no gate experts"):
        _layer(path, layer_idx=0)
    with pytest.raises(ValueError, match=r"weight_path=None"):
        _layer(None)
    with pytest.raises(NotImplementedError, match=r"threadpool_count=1"):
        _layer(path, threadpool_count=2, cpuinfer_threads=2)
    moe = _layer(path)
    with pytest.raises(ValueError, match=r"load_weights_from_tensors"):
        moe.load_weights_from_tensors(None, None, None)
    # ggml types LLAMAFILE does not run (Q8_1; IQ4_NL, which kt's reader knows only by size): the tensor
    # named, the supported types listed.
    for qtype, bytes_per_32 in ((T.Q8_1, 40), (T.IQ4_NL, 18)):  # Q8_1 sized as the gguf package sizes it
        bad = str(tmp_path / f"{qtype.name}.gguf")
        writer = gguf.GGUFWriter(bad, "qwen3moe")
        for proj, n, k in (("gate", I, H), ("up", I, H), ("down", H, I)):
            raw = np.zeros((E, n, k // 32 * bytes_per_32), dtype=np.uint8)
            writer.add_tensor(f"blk.1.ffn_{proj}_exps.weight", raw, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(ValueError, match=rf"blk\.1\.ffn_gate_exps\.weight is {qtype.name}; method LLAMAFILE runs "
                                             r"Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16, F16, F32"):
            _layer(bad)


def test_split_set_and_physical_map(tmp_path):
    # The same layer from a two-part split set (the experts in the second part), with a permuted map.
    one = str(tmp_path / "one.gguf")
    w = _write(one, T.Q8_0, T.Q8_0, seed=9)
    parts = tmp_path / "split"
    parts.mkdir()
    _write(str(parts / "m-00001-of-00002.gguf"), T.Q4_0, T.Q4_0, seed=1, layer=0)
    _write(str(parts / "m-00002-of-00002.gguf"), T.Q8_0, T.Q8_0, seed=9)
    perm = torch.tensor([2, 0, 3, 1], dtype=torch.int64)
    outs = []
    for path, mapping in ((one, None), (str(parts / "m-00001-of-00002.gguf"), perm), (str(parts), perm)):
        moe = _layer(path)
        moe.load_weights(mapping)
        x, ids, topw = _routing(5, 8)
        outs.append(moe.forward(x, ids if mapping is None else torch.argsort(perm)[ids], topw))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_serving_path_and_gpu_mask(tmp_path):
    # The serving entry points (submit_forward / sync_forward on CPU tensors, int32 ids with -1 padding, a
    # chunked batch longer than chunked_prefill_size) and gpu_experts_mask give forward's numbers.
    path = str(tmp_path / "s.gguf")
    _write(path, T.Q4_K, T.Q6_K, seed=3)
    mask = torch.zeros(E, dtype=torch.bool)
    mask[1] = True
    moe = _layer(path, gpu_experts_mask=mask)
    moe.load_weights()
    x, ids, topw = _routing(20, 6)  # 20 > chunked_prefill_size = 16: two chunks
    ids32 = ids.to(torch.int32)
    ids32[3, 1] = -1
    ids64 = ids32.to(torch.int64)
    want = torch.cat([moe.forward(x[:16], ids64[:16], topw[:16]), moe.forward(x[16:], ids64[16:], topw[16:])])
    moe.submit_forward(x, ids32, topw)
    got = moe.sync_forward(x)
    assert torch.equal(got, want)
    # Expert 1 is masked to the GPU: the result is the other experts' sum.
    plain = _layer(path)
    plain.load_weights()
    masked_ids = ids.masked_fill(ids == 1, E)  # an id >= E contributes nothing
    assert torch.equal(moe.forward(x[:9], ids[:9], topw[:9]), plain.forward(x[:9], masked_ids[:9], topw[:9]))
