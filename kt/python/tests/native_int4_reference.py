"""The float reference of the native int4 methods (RAWINT4, GPTQ_INT4) and its error bound, in numpy: shared
by native_int4_test.py (here, Bazel, every kernel path the CPU has) and tests_integration/test_native_int4.py
(against compressed-tensors' own decoder).

Decoders written from the formats' documented layouts (kt/io/hf_int4.h, docs/FORMATS.md), element by element
with shifts and masks (not kt's byte-wise re-bias):
  rawint4_dequantize: weight_packed int32 [N, K/8], element 8i + j at bits 4j of word i, offset binary (u - 8),
      times weight_scale [N, K/G] (bf16 bits);
  gptq_dequantize: qweight int32 [K/8, N], k = 8i + j at bits 4j of row i; qzeros [K/G, N/8] along N, stored
      as zero - 1 (checkpoint_format "gptq"); fp16 scales [K/G, N]; g_idx [K]; W = ((u - z) * s)^T.

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

import numpy as np
import torch


def rawint4_dequantize(packed, scale_bits, G):
    """W [N, K] float64 from compressed-tensors pack-quantized tensors (scale_bits: the bf16 bit patterns)."""
    words = packed.view(np.uint32)
    N, K8 = words.shape
    u = np.stack([(words >> (4 * j)) & 15 for j in range(8)], axis=2).reshape(N, K8 * 8).astype(np.int64)
    scale = (scale_bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return (u - 8) * np.repeat(scale, G, axis=1)


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
