"""Methods RAWINT4 and GPTQ_INT4 on the native int4 checkpoints of testdata/hf (tools/fixtures_int4.py),
against each format's own decoder (issue 15):

- kimi_k2_rawint4 (compressed-tensors pack-quantized, groups of 32): dequantized by compressed-tensors'
  ``PackedQuantizationCompressor.decompress`` (its scales widened to float32 first, so the oracle's weights
  are q * scale exactly);
- qwen3_moe_gptq (GPTQ sym, groups of 128): dequantized by ``gptq_dequantize`` below, written from GPTQ's
  documented layout (qweight [K/8, N] nibbles along K, qzeros v1 = zero - 1, fp16 scales [K/G, N]).

kt loads each folder with ``KTMoEWrapper(method=..., weight_path=...).load_weights()`` and its forward is
compared with a float64 MoE over the oracle's weights, on the recorded tokens and routing of
``reference.npz`` (whose ``routed_T``, transformers' float32 output over the same dequantized weights, checks
the float reference itself).

The bound (per output element, computed from the data). kt holds the oracle's weights exactly, so all of its
error is the int8 activation quantization (per group of G, scale s = max|v_g| / 127, round to nearest) and
bf16 rounding. A worst-case sum of |W| times half a step is useless here (it exceeds the output: the errors
of 256 terms do not all point one way), so the bound treats each rounding as what it is, an independent
error uniform in half a step (variance s^2 / 12), and propagates variances:
  var(g_i) = sum_k W_gate[i, k]^2 s_k^2 / 12 (u likewise);
  sd(h_i) = |silu'(g_i)| |u_i| sd(g_i) + |silu(g_i)| sd(u_i)   (sds added, not squared: conservative);
  var(h_i) += (2^-9 |h_i|)^2 / 3 (h rounded to bf16) + s_h^2 / 12 (h quantized again, per group);
  var(out_n) = sum_j w_j^2 sum_k W_down[n, k]^2 var(h_k);
  bound_n = 6 sd(out_n) + 2^-8 |out_n| (the output's bf16 rounding).
Six standard deviations: a normal tail of 2e-9 per element, over the ~10^4 elements compared. Measured:
the worst element reaches 0.55 of its bound, and the bound is 4-5% of max|out|.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from hf_models import TESTDATA_HF

import kt_kernel
from kt_kernel import KTMoEWrapper


def folder(name):
    return os.path.join(TESTDATA_HF, name)


def rawint4_oracle(path, layer, E):
    """{e: (gate, up, down)} float64 from compressed-tensors' own decompression."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors import safe_open

    with open(os.path.join(path, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    scheme = QuantizationScheme(**qc["config_groups"]["group_0"])
    out = {}
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        for e in range(E):
            mats = []
            for p in ("gate_proj", "up_proj", "down_proj"):
                base = f"model.layers.{layer}.mlp.experts.{e}.{p}."
                state = {k: f.get_tensor(base + k) for k in ("weight_packed", "weight_scale", "weight_shape")}
                state["weight_scale"] = state["weight_scale"].float()
                mats.append(PackedQuantizationCompressor.decompress(state, scheme)["weight"].double().numpy())
            out[e] = mats
    return out


def gptq_dequantize(qweight, qzeros, scales, g_idx):
    """W [N, K] float64 from GPTQ's tensors (v1 format: the stored zero is zero - 1)."""
    qw = qweight.view(np.uint32)
    K8, N = qw.shape
    q = np.stack([(qw >> (4 * j)) & 15 for j in range(8)], axis=1).reshape(K8 * 8, N).astype(np.int64)
    qz = qzeros.view(np.uint32)
    z = np.stack([(qz >> (4 * j)) & 15 for j in range(8)], axis=2).reshape(qz.shape[0], N).astype(np.int64) + 1
    g = g_idx.astype(np.int64)
    w = (q - z[g]) * scales.astype(np.float64)[g]
    return w.T


def gptq_oracle(path, layer, E):
    from safetensors import safe_open

    out = {}
    with safe_open(os.path.join(path, "model.safetensors"), "np") as f:
        for e in range(E):
            mats = []
            for p in ("gate_proj", "up_proj", "down_proj"):
                base = f"model.layers.{layer}.mlp.experts.{e}.{p}."
                mats.append(gptq_dequantize(*(f.get_tensor(base + k) for k in ("qweight", "qzeros", "scales", "g_idx"))))
            out[e] = mats
    return out


def silu(v):
    return v / (1 + np.exp(-v))


def group_step(v, G):
    """The int8 step max|v_g| / 127 of each element's group of G (last axis), broadcast back."""
    shape = v.shape
    amax = np.abs(v.reshape(*shape[:-1], -1, G)).max(axis=-1, keepdims=True)
    return np.broadcast_to(amax / 127.0, (*shape[:-1], shape[-1] // G, G)).reshape(shape)


def quantize_groups(v, G):
    """v through kt's activation quantization (act_quant.h): int8 per group of G, scale max|v_g| / 127,
    round half away from zero; returned dequantized (q * scale)."""
    s = group_step(v, G)
    safe = np.where(s > 0, s, 1.0)
    q = np.clip(np.sign(v) * np.floor(np.abs(v / safe) + 0.5), -127, 127)
    return q * s


def to_bf16(v):
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(torch.bfloat16).double().numpy()


def reference_and_bound(weights, x, ids, w, G):
    """(float64 MoE output [T, H], its bound, kt's arithmetic emulated [T, H]); see the module docstring."""
    T, H = x.shape
    ref, var, emu = np.zeros((T, H)), np.zeros((T, H)), np.zeros((T, H))
    for t in range(T):
        var_x = group_step(x[t], G) ** 2 / 12  # uniform rounding error of each quantized x
        xq = quantize_groups(x[t], G)
        for j, e in enumerate(ids[t]):
            Wg, Wu, Wd = weights[int(e)]
            g, u = Wg @ x[t], Wu @ x[t]
            sd_g, sd_u = np.sqrt(Wg**2 @ var_x), np.sqrt(Wu**2 @ var_x)
            h = silu(g) * u
            dsilu = np.abs(silu(g) * (1 - silu(g) / np.where(g == 0, 1, g)) + silu(g) / np.where(g == 0, 1, g))
            # d silu/dg = sigmoid(g) (1 + g (1 - sigmoid(g))), bounded by 1.1; written via silu(g) / g.
            dsilu = np.minimum(dsilu, 1.1)
            sd_h = dsilu * np.abs(u) * sd_g + np.abs(silu(g)) * sd_u  # sds added: a conservative sum
            var_h = sd_h**2 + (2.0**-9 * np.abs(h)) ** 2 / 3 + group_step(h, G) ** 2 / 12  # + bf16, + int8
            ref[t] += w[t, j] * (Wd @ h)
            var[t] += w[t, j] ** 2 * (Wd**2 @ var_h)
            hq = quantize_groups(to_bf16(silu(Wg @ xq) * (Wu @ xq)), G)
            emu[t] += w[t, j] * (Wd @ hq)
    bound = 6 * np.sqrt(var) + 2.0**-8 * np.abs(ref)
    return ref, bound, emu


CASES = {
    "kimi_k2_rawint4": ("RAWINT4", rawint4_oracle, 32),
    "qwen3_moe_gptq": ("GPTQ_INT4", gptq_oracle, 128),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_native_int4_layer_matches_oracle(name):
    method, oracle, G = CASES[name]
    path = folder(name)
    ref_npz = np.load(os.path.join(path, "reference.npz"))
    layer = int(ref_npz["layer"])
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    E = cfg.get("n_routed_experts") or cfg["num_local_experts"]
    H, I = cfg["hidden_size"], cfg["moe_intermediate_size"]
    k = cfg["num_experts_per_tok"]
    moe = KTMoEWrapper(
        layer_idx=layer, num_experts=E, num_experts_per_tok=k, hidden_size=H, moe_intermediate_size=I,
        gpu_experts_mask=None, cpuinfer_threads=2, threadpool_count=1, weight_path=path,
        chunked_prefill_size=64, method=method,
    )
    assert moe.weight_format == "int4_group_sym" and moe.group_size == G  # the checkpoint's G, not 128
    moe.load_weights()
    weights = oracle(path, layer, E)
    for T in (1, 7, 33):
        x = ref_npz[f"x_{T}"]
        ids, w = ref_npz[f"ids_{T}"], ref_npz[f"weights_{T}"]
        out = moe.forward(torch.from_numpy(x).to(torch.bfloat16), torch.from_numpy(ids),
                          torch.from_numpy(w)).float().numpy()
        ref, bound, emu = reference_and_bound(weights, x.astype(np.float64), ids, w.astype(np.float64), G)
        # The float reference is transformers' own (float32, same dequantized weights) to fp32 accuracy.
        routed = ref_npz[f"routed_{T}"]
        assert np.abs(ref - routed).max() <= 1e-5 * np.abs(ref).max(), (name, T)
        err = np.abs(out - ref)
        worst = int(np.argmax(err / bound))
        emu_err = np.abs(out - emu).max() / np.abs(emu).max()
        print(f"{name} T={T} isa={moe.isa}: max|err| {err.max():.3g}, max|ref| {np.abs(ref).max():.3g}, "
              f"bound max {bound.max():.3g}, worst err/bound {err.flat[worst] / bound.flat[worst]:.3f}, "
              f"vs kt's arithmetic emulated {emu_err:.2g} of max")
        assert (err <= bound).all(), (name, T, worst, err.flat[worst], bound.flat[worst])
        # The bound is a real constraint, well below the signal (so a wrong weight would fail it).
        assert bound.max() < 0.1 * np.abs(ref).max(), (name, T, bound.max())
        # Tighter: kt's own steps (int8 x, bf16 h, int8 h) done in float64 land within 2e-2 of max|out|
        # (measured <= 0.83e-2: bf16 output rounding, 2^-9 relative, plus near-ties of h's bf16 rounding
        # and of the int8 steps that float64 resolves differently than kt's fp32, each worth one step times
        # the down weights).
        assert emu_err <= 2e-2, (name, T, emu_err)


def test_bound_detects_a_wrong_weight_column():
    # The comparison can fail: one down column of one routed expert 1.5x too large moves the output past the
    # bound.
    path = folder("qwen3_moe_gptq")
    ref_npz = np.load(os.path.join(path, "reference.npz"))
    weights = gptq_oracle(path, 0, 4)
    x, ids, w = ref_npz["x_7"].astype(np.float64), ref_npz["ids_7"], ref_npz["weights_7"].astype(np.float64)
    ref, bound, _ = reference_and_bound(weights, x, ids, w, 128)
    e = int(ids[0, 0])
    wrong = {k: [m.copy() for m in v] for k, v in weights.items()}
    col = int(np.argmax(np.abs(wrong[e][2]).sum(axis=0)))  # the down column that matters most
    wrong[e][2][:, col] *= 1.5
    bad, _, _ = reference_and_bound(wrong, x, ids, w, 128)
    assert (np.abs(bad - ref) > bound).any()


def test_gptq_config_kt_cannot_read_is_named(tmp_path):
    # A quantization_config value outside what kt reads exactly is a ValueError naming the field and value.
    src = folder("qwen3_moe_gptq")
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"]["desc_act"] = True
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    os.symlink(os.path.join(src, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"quantization_config.desc_act is true; kt reads GPTQ with desc_act false"):
        KTMoEWrapper(
            layer_idx=0, num_experts=4, num_experts_per_tok=2, hidden_size=256, moe_intermediate_size=128,
            gpu_experts_mask=None, cpuinfer_threads=2, threadpool_count=1, weight_path=str(tmp_path),
            chunked_prefill_size=8, method="GPTQ_INT4",
        )
