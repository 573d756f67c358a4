"""KTMoEWrapper(method="BF16") on every family's test checkpoint against transformers' own outputs.

testdata/hf (tools/make_fixtures.py) holds one tiny random model per family kt maps, saved by transformers,
with ``reference.npz``: for the first MoE layer, inputs x_T, the router's choices ids_T/weights_T and the
routed experts' output routed_T as transformers computes it, for T = 1, 7, 33 tokens.

For each family:
  - the test's own fp32 torch reference over the experts read with the numpy reader agrees with routed_T
    within TRANSFORMERS_TOL (checks that reading, and the data);
  - kt over those tensors (load_weights_from_tensors) and kt reading the folder itself (weight_path: kt's
    architecture mapping, tensor names and layouts) agree with that fp32 reference within
    moe_reference.REL_TOL, kt's own bound (bf16 rounding of h and of the output, fp32 sums in another order),
    and with routed_T within TRANSFORMERS_TOL.

TRANSFORMERS_TOL (moe_reference) allows for transformers computing the bf16 model in bf16 throughout.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import testdata
from kt_kernel import KTMoEWrapper
from moe_reference import REL_TOL, TRANSFORMERS_TOL, reference_moe, relative_error, wrapper_args
from safetensors_np import SafeTensorsFile

# The checkpoints with bf16 experts (the others ship a quantized format: FP8, MX, native int4).
BF16_NAMES = [n for n in testdata.names()
              if not n.endswith(("_fp8", "_mxfp4", "_mxfp8", "_rawint4", "_gptq"))]


def test_every_family_is_there():
    """The families the issue tracker and README promise, one checkpoint each (a missing folder fails)."""
    expected = {
        "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v3_fp8", "deepseek_v4_mxfp4", "glm4_moe",
        "glm4_moe_channel_fp8",
        "glm4_moe_lite",
        "glm4v_moe", "glm_moe_dsa", "minimax", "minimax_m2", "minimax_m3_mxfp8",
        "mixtral", "qwen2_moe", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_moe", "qwen3_next", "qwen3_vl_moe",
        "qwen3_vl_moe_resaved",
    }
    assert expected <= set(testdata.names())


def make(name: str, weight_path=None) -> KTMoEWrapper:
    E, k, H, I = testdata.shape(name)
    layer = int(testdata.reference(name)["layer"])
    return KTMoEWrapper(**wrapper_args(E, k, H, I, layer_idx=layer, weight_path=weight_path,
                                       chunked_prefill_size=max(testdata.TOKENS), method="BF16"))


@pytest.mark.parametrize("name", BF16_NAMES)
def test_routed_experts_match_transformers(name):
    ref = testdata.reference(name)
    E, k, H, I = testdata.shape(name)
    gate, up, down = testdata.stacked_experts(name, int(ref["layer"]))
    assert gate.shape == (E, I, H) and down.shape == (E, H, I)

    from_tensors = make(name, weight_path=testdata.path(name))
    from_tensors.load_weights_from_tensors(gate, up, down, None)
    from_folder = make(name, weight_path=testdata.path(name))
    from_folder.load_weights(torch.arange(E, dtype=torch.int64))
    for T in testdata.TOKENS:
        x, ids, weights, expected = testdata.inputs(ref, T)
        assert ids.shape == (T, k)
        fp32 = reference_moe(x, ids, weights, gate, up, down)
        ours = relative_error(fp32, expected)
        assert ours <= TRANSFORMERS_TOL, f"{name} T={T}: the test's own reference is off by {ours:.3e}"
        for how, moe in (("tensors", from_tensors), ("weight_path", from_folder)):
            out = moe.forward(x, ids, weights, None)
            assert out.shape == (T, H)
            err = relative_error(out, fp32)
            assert err <= REL_TOL, f"{name} ({how}) T={T}: max|err|/max|fp32 ref| = {err:.3e}"
            err = relative_error(out, expected)
            assert err <= TRANSFORMERS_TOL, f"{name} ({how}) T={T}: max|err|/max|transformers| = {err:.3e}"


def e4m3_to_float(raw: np.ndarray) -> np.ndarray:
    """FP8 E4M3 (the "fn" variant: no infinities, S.1111.111 is NaN) decoded from its definition."""
    b = raw.astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    return np.where((b & 0x7F) == 0x7F, np.nan, sign * value)


def test_fp8_checkpoint_reference_is_its_dequantized_weights():
    """deepseek_v3_fp8's routed_T is transformers' output for weight x its 128x128 block's scale_inv: the
    exact target of an FP8 path (checked here so that the later FP8 method is tested against sound data)."""
    name = "deepseek_v3_fp8"
    ref = testdata.reference(name)
    E, k, H, I = testdata.shape(name)
    layer = int(ref["layer"])
    st = SafeTensorsFile(testdata.path(name) + "/model.safetensors")
    header = st.header

    def dequantized(tensor: str) -> torch.Tensor:
        entry = header[tensor]
        assert entry["dtype"] == "F8_E4M3", entry
        begin, end = entry["data_offsets"]
        w = e4m3_to_float(np.frombuffer(st._data[begin:end].tobytes(), dtype=np.uint8)).reshape(entry["shape"])
        scale = st.get(tensor + "_scale_inv").double().numpy()
        assert scale.shape == tuple(-(-d // 128) for d in w.shape)
        full = np.kron(scale, np.ones((128, 128)))[: w.shape[0], : w.shape[1]]
        return torch.from_numpy(w * full)

    base = f"model.layers.{layer}.mlp.experts."
    gate, up, down = (torch.stack([dequantized(f"{base}{e}.{p}.weight") for e in range(E)]).float()
                      for p in ("gate_proj", "up_proj", "down_proj"))
    for T in testdata.TOKENS:
        x, ids, weights, expected = testdata.inputs(ref, T)
        out = torch.zeros(T, H, dtype=torch.float64)
        for t in range(T):
            for j in range(k):
                e = int(ids[t, j])
                g, u = gate[e].double() @ x[t].double(), up[e].double() @ x[t].double()
                out[t] += float(weights[t, j]) * (down[e].double() @ (torch.nn.functional.silu(g) * u))
        # transformers ran this in float32: agreement to ~1e-6 relative; 1e-4 leaves margin for its sum order.
        err = relative_error(out.float(), expected)
        assert err <= 1e-4, f"T={T}: {err:.3e}"


def fp8_experts(name: str, layer: int):
    """The checkpoint's FP8 experts as shipped: float8_e4m3fn (uint8 on torch < 2.1) gate/up [E, I, H], down [E, H, I] and their
    float32 weight_scale_inv [E, ceil(N/128), ceil(K/128)], read with the numpy reader (not kt)."""
    E = testdata.shape(name)[0]
    st = SafeTensorsFile(testdata.path(name) + "/model.safetensors")

    def codes(tensor: str) -> torch.Tensor:
        entry = st.header[tensor]
        assert entry["dtype"] == "F8_E4M3", entry
        begin, end = entry["data_offsets"]
        raw = np.frombuffer(st._data[begin:end].tobytes(), dtype=np.uint8).reshape(entry["shape"])
        codes = torch.from_numpy(raw.copy())
        # float8_e4m3fn where this torch has it; kt takes the same bytes as uint8 otherwise.
        return codes.view(torch.float8_e4m3fn) if hasattr(torch, "float8_e4m3fn") else codes

    base = f"model.layers.{layer}.mlp.experts."
    out = []
    for p in ("gate_proj", "up_proj", "down_proj"):
        out.append(torch.stack([codes(f"{base}{e}.{p}.weight") for e in range(E)]).contiguous())
        out.append(torch.stack([st.get(f"{base}{e}.{p}.weight_scale_inv").float() for e in range(E)]).contiguous())
    return out  # gate, gate_scale, up, up_scale, down, down_scale


# Method FP8 against transformers' fine-grained FP8 output (routed_T: the model run on weight x scale_inv
# in float32). kt multiplies the same dequantized weights exactly (fp32 products of exact values); what
# remains is bf16 activations, h rounded to bf16 and the bf16 output: within REL_TOL (1e-2) of max|ref|.
FP8_TOL = 1e-2


def test_fp8_method_matches_transformers():
    name = "deepseek_v3_fp8"
    ref = testdata.reference(name)
    E, k, H, I = testdata.shape(name)
    layer = int(ref["layer"])
    args = wrapper_args(E, k, H, I, layer_idx=layer, weight_path=testdata.path(name),
                        chunked_prefill_size=max(testdata.TOKENS), method="FP8")
    from_folder = KTMoEWrapper(**args)
    from_folder.load_weights(None)
    assert from_folder.weight_format == "fp8_block"
    gate, gs, up, us, down, ds = fp8_experts(name, layer)
    from_tensors = KTMoEWrapper(**args)
    from_tensors.load_weights_from_tensors(gate, up, down, None, gate_scale_inv=gs, up_scale_inv=us,
                                           down_scale_inv=ds)
    worst = 0.0
    for T in testdata.TOKENS:
        x, ids, weights, expected = testdata.inputs(ref, T)
        a = from_folder.forward(x, ids, weights, None)
        b = from_tensors.forward(x, ids, weights, None)
        assert torch.equal(a, b), f"T={T}: folder and tensors loads differ"
        err = relative_error(a, expected)
        worst = max(worst, err)
        assert err <= FP8_TOL, f"T={T}: max|err|/max|transformers| = {err:.3e}"
    print(f"deepseek_v3_fp8 method FP8 vs transformers: worst max|err|/max|ref| = {worst:.3e}")


def test_fp8_method_checks_its_tensors():
    name = "deepseek_v3_fp8"
    E, k, H, I = testdata.shape(name)
    moe = KTMoEWrapper(**wrapper_args(E, k, H, I, layer_idx=1, weight_path=None, chunked_prefill_size=8,
                                      method="FP8"))
    gate, gs, up, us, down, ds = fp8_experts(name, 1)
    with pytest.raises(ValueError, match="gate_scale_inv is required"):
        moe.load_weights_from_tensors(gate, up, down, None)
    with pytest.raises(ValueError, match="down_scale_inv must have shape"):
        moe.load_weights_from_tensors(gate, up, down, None, gate_scale_inv=gs, up_scale_inv=us,
                                      down_scale_inv=gs)
    assert not moe.weights_loaded


def channel_fp8_experts(name: str, layer: int):
    """The per-channel FP8 checkpoint's experts as shipped (numpy reader, not kt): E4M3 codes (float8_e4m3fn,
    uint8 on torch < 2.1) and weight_scale [E, N, 1] as stored (bf16), and the weights dequantized from the
    format's definition (e4m3_to_float(code) * scale, in float64)."""
    E = testdata.shape(name)[0]
    st = SafeTensorsFile(testdata.path(name) + "/model.safetensors")
    base = f"model.layers.{layer}.mlp.experts."
    codes, scales, deq = [], [], []
    for p in ("gate_proj", "up_proj", "down_proj"):
        c, sc, d = [], [], []
        for e in range(E):
            entry = st.header[f"{base}{e}.{p}.weight"]
            assert entry["dtype"] == "F8_E4M3", entry
            begin, end = entry["data_offsets"]
            raw = np.frombuffer(st._data[begin:end].tobytes(), dtype=np.uint8).reshape(entry["shape"])
            scale = st.get(f"{base}{e}.{p}.weight_scale")
            assert scale.dtype == torch.bfloat16 and tuple(scale.shape) == (raw.shape[0], 1)
            t = torch.from_numpy(raw.copy())
            c.append(t.view(torch.float8_e4m3fn) if hasattr(torch, "float8_e4m3fn") else t)
            sc.append(scale)
            d.append(torch.from_numpy(e4m3_to_float(raw) * scale.double().numpy()))
        codes.append(torch.stack(c).contiguous())
        scales.append(torch.stack(sc).contiguous())
        deq.append(torch.stack(d))
    return codes, scales, deq


def test_fp8_perchannel_method_matches_transformers():
    """Method FP8_PERCHANNEL on glm4_moe_channel_fp8 (GLM-4.x FP8's layout) from the folder and from tensors,
    against transformers' output for the dequantized weights (routed_T), itself first checked against a
    float64 MoE over the weights dequantized from the E4M3 definition (1e-4: transformers' float32 sums)."""
    name = "glm4_moe_channel_fp8"
    ref = testdata.reference(name)
    E, k, H, I = testdata.shape(name)
    layer = int(ref["layer"])
    codes, scales, deq = channel_fp8_experts(name, layer)
    args = wrapper_args(E, k, H, I, layer_idx=layer, weight_path=testdata.path(name),
                        chunked_prefill_size=max(testdata.TOKENS), method="FP8_PERCHANNEL")
    from_folder = KTMoEWrapper(**args)
    from_folder.load_weights(None)
    assert from_folder.weight_format == "fp8_block"
    from_tensors = KTMoEWrapper(**args)
    from_tensors.load_weights_from_tensors(codes[0], codes[1], codes[2], None, gate_scale=scales[0],
                                           up_scale=scales[1], down_scale=scales[2])
    worst = 0.0
    for T in testdata.TOKENS:
        x, ids, weights, expected = testdata.inputs(ref, T)
        exact = torch.zeros(T, H, dtype=torch.float64)
        for t in range(T):
            for j in range(k):
                e, xt = int(ids[t, j]), x[t].double()
                g, u = deq[0][e] @ xt, deq[1][e] @ xt
                exact[t] += float(weights[t, j]) * (deq[2][e] @ (torch.nn.functional.silu(g) * u))
        assert relative_error(exact.float(), expected) <= 1e-4, f"T={T}: the fixture's reference is off"
        a = from_folder.forward(x, ids, weights, None)
        b = from_tensors.forward(x, ids, weights, None)
        assert torch.equal(a, b), f"T={T}: folder and tensors loads differ"
        err = relative_error(a, expected)
        worst = max(worst, err)
        assert err <= FP8_TOL, f"T={T}: max|err|/max|transformers| = {err:.3e}"
    print(f"{name} method FP8_PERCHANNEL vs transformers: worst max|err|/max|ref| = {worst:.3e}")


def test_fp8_perchannel_method_checks_its_tensors():
    name = "glm4_moe_channel_fp8"
    E, k, H, I = testdata.shape(name)
    moe = KTMoEWrapper(**wrapper_args(E, k, H, I, layer_idx=1, weight_path=None, chunked_prefill_size=8,
                                      method="FP8_PERCHANNEL"))
    codes, scales, _ = channel_fp8_experts(name, 1)
    with pytest.raises(ValueError, match="gate_scale is required"):
        moe.load_weights_from_tensors(codes[0], codes[1], codes[2], None)
    with pytest.raises(ValueError, match=r"down_scale must have shape \[E, H\]"):
        moe.load_weights_from_tensors(codes[0], codes[1], codes[2], None, gate_scale=scales[0],
                                      up_scale=scales[1], down_scale=scales[0][:, :, 0].contiguous())
    with pytest.raises(TypeError, match="FP8_PERCHANNEL takes float8_e4m3fn weights"):
        moe.load_weights_from_tensors(*(torch.zeros(c.shape, dtype=torch.bfloat16) for c in codes), None)
    assert not moe.weights_loaded
    # Per-row scales do not fit the GPU's 128 x 128 block-scale layout: the GPU write refuses the method.
    moe.load_weights_from_tensors(codes[0], codes[1], codes[2], None, gate_scale=scales[0], up_scale=scales[1],
                                  down_scale=scales[2])
    with pytest.raises(NotImplementedError, match="FP8_PERCHANNEL"):
        moe.submit_write_weight_scale_to_buffer(1, 0, [0], [0], [0], [0])


def test_mxfp4_method_matches_transformers_deepseek_v4():
    """deepseek_v4_mxfp4 (DeepSeek-V4-Flash's expert tensors as shipped) with method MXFP4 and the config's
    swiglu_limit, from the folder and from the raw tensors, against transformers' DeepseekV4Experts over the
    weights its MXFP4 integration dequantizes (routed_T): within FP8_TOL, and far from it without the limit."""
    name = "deepseek_v4_mxfp4"
    ref = testdata.reference(name)
    E, k, H, I = testdata.shape(name)
    limit = float(testdata.config(name)["swiglu_limit"])
    args = wrapper_args(E, k, H, I, layer_idx=0, weight_path=testdata.path(name),
                        chunked_prefill_size=max(testdata.TOKENS), method="MXFP4")
    from_folder = KTMoEWrapper(**args, swiglu_limit=limit)
    from_folder.load_weights(None)
    assert from_folder.weight_format == "mxfp4"
    no_limit = KTMoEWrapper(**args)
    no_limit.load_weights(None)
    st = SafeTensorsFile(testdata.path(name) + "/model.safetensors")

    def raw(tensor: str, dtype: str) -> torch.Tensor:
        entry = st.header[tensor]
        assert entry["dtype"] == dtype, entry
        begin, end = entry["data_offsets"]
        return torch.from_numpy(np.frombuffer(st._data[begin:end].tobytes(), dtype=np.uint8).reshape(entry["shape"]))

    t = []
    for p in ("w1", "w3", "w2"):
        t.append(torch.stack([raw(f"layers.0.ffn.experts.{e}.{p}.weight", "I8") for e in range(E)]).contiguous())
        t.append(torch.stack([raw(f"layers.0.ffn.experts.{e}.{p}.scale", "F8_E8M0") for e in range(E)]).contiguous())
    from_tensors = KTMoEWrapper(**args, swiglu_limit=limit)
    from_tensors.load_weights_from_tensors(t[0].view(torch.int8), t[2], t[4], None, gate_scale=t[1], up_scale=t[3],
                                           down_scale=t[5])
    for T in testdata.TOKENS:
        x, ids, weights, expected = testdata.inputs(ref, T)
        a = from_folder.forward(x, ids, weights, None)
        assert torch.equal(a, from_tensors.forward(x, ids, weights, None)), f"T={T}: folder and tensors differ"
        err = relative_error(a, expected)
        assert err <= FP8_TOL, f"T={T}: max|err|/max|transformers| = {err:.3e}"
        assert relative_error(no_limit.forward(x, ids, weights, None), expected) > 5 * FP8_TOL


def e4m3_from_spec(codes: np.ndarray) -> np.ndarray:
    """E4M3 ("e4m3fn") codes to float64 from the format's definition: s.eeee.mmm, bias 7, exponent 0
    subnormal (m * 2^-9), s.1111.111 NaN."""
    c = codes.astype(np.int64)
    e, m = (c >> 3) & 15, (c & 7).astype(np.float64)
    mag = np.where(e == 0, m * 2.0 ** -9, (1 + m / 8) * 2.0 ** (e - 7))
    mag = np.where((e == 15) & (m == 7), np.nan, mag)
    return np.where(c >> 7, -mag, mag)


def test_mxfp8_method_matches_minimax_m3():
    """minimax_m3_mxfp8 (MiniMax-M3-MXFP8's expert tensors as shipped) with method MXFP8 and the config's
    swiglu_alpha / swiglu_limit, read from the folder, against two references: transformers'
    MiniMaxM3VLExperts (routed_T, fixture time) and this test's float64 swigluoai MoE over the weights
    dequantized here from the E4M3 and E8M0 definitions (the two agree to float32 rounding). kt's weights are
    the file's exactly, so its error is the bf16 rounding of h and of the output plus the fp32 sums: within
    FP8_TOL, as for FP8. A layer made without the config's activation is refused, naming it."""
    name = "minimax_m3_mxfp8"
    ref = testdata.reference(name)
    layer = int(ref["layer"])
    E, k, H, I = testdata.shape(name)
    tc = testdata.text_config(name)
    alpha, limit = float(tc["swiglu_alpha"]), float(tc["swiglu_limit"])
    args = wrapper_args(E, k, H, I, layer_idx=layer, weight_path=testdata.path(name),
                        chunked_prefill_size=max(testdata.TOKENS), method="MXFP8")
    moe = KTMoEWrapper(**args, swiglu_alpha=alpha, swiglu_limit=limit)
    moe.load_weights(None)
    assert moe.weight_format == "mxfp8"
    st = SafeTensorsFile(testdata.path(name) + "/model.safetensors")

    def raw(tensor: str, dtype: str) -> np.ndarray:
        entry = st.header[tensor]
        assert entry["dtype"] == dtype, entry
        begin, end = entry["data_offsets"]
        return np.frombuffer(st._data[begin:end].tobytes(), dtype=np.uint8).reshape(entry["shape"])

    w = {}
    for e in range(E):
        for p in ("w1", "w3", "w2"):
            base = f"language_model.model.layers.{layer}.block_sparse_moe.experts.{e}.{p}"
            scale = 2.0 ** (raw(base + ".weight_scale_inv", "U8").astype(np.float64) - 127)
            w[e, p] = e4m3_from_spec(raw(base + ".weight", "F8_E4M3")) * np.repeat(scale, 32, axis=1)
    for T in testdata.TOKENS:
        x, ids, weights, expected = testdata.inputs(ref, T)
        xd, mine = x.double().numpy(), np.zeros((T, H))
        for t in range(T):
            for j in range(k):
                e = int(ids[t, j])
                g, u = np.minimum(w[e, "w1"] @ xd[t], limit), np.clip(w[e, "w3"] @ xd[t], -limit, limit)
                mine[t] += float(weights[t, j]) * (w[e, "w2"] @ (g / (1 + np.exp(-alpha * g)) * (u + 1)))
        assert relative_error(torch.from_numpy(mine), expected) <= 1e-5, f"T={T}: the two references differ"
        err = relative_error(moe.forward(x, ids, weights, None), torch.from_numpy(mine))
        assert err <= FP8_TOL, f"T={T}: max|err|/max|ref| = {err:.3e}"
    with pytest.raises(ValueError, match="swiglu_alpha = 1.702, swiglu_limit = 2"):
        KTMoEWrapper(**args).load_weights(None)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
