"""PyTorch references of kt's routed-experts forward (BF16, and an integer format given its quantizers), and
helpers shared by the tests."""

from __future__ import annotations

from typing import Callable, Optional

import torch

# Accuracy bound, max|out - ref| / max|ref|, for bf16 outputs against the fp32 reference below.
# The output is rounded once to bf16 (relative error <= 2^-8 ~ 3.9e-3 of each element, so of max|ref|);
# the kernel accumulates the fp32 dot products in a different order (blocked/SIMD partial sums) and rounds
# the bf16 intermediate h = silu(g)*u, where an order-induced difference can flip one bf16 rounding
# (another 2^-8 relative on that element, damped by the down projection). Together this stays well under
# 1e-2 while any real bug (a wrong expert, weight, slot or transposition) gives errors of order 1.
REL_TOL = 1e-2

# Bound, max|out - ref| / max|ref|, against transformers' own output of a bf16 model (testdata/hf's routed_T).
# transformers computes in bf16 throughout: g and u, silu(g), silu(g) * u, the down projection, its product
# with the routing weight and the sum over the k experts are each rounded to bf16 (at most 2^-8 ~ 3.9e-3
# relative per step): six roundings bound its distance from the fp32 value by ~6 * 2^-8 ~ 2.3e-2 of an
# element (they partly cancel; ~1e-2 is seen), and kt adds its own REL_TOL-sized rounding. 2.5e-2 holds both,
# while a wrong expert, weight, layout or transposition gives errors of order 1.
TRANSFORMERS_TOL = 2.5e-2


def reference_moe(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gpu_experts_mask: Optional[torch.Tensor] = None,
    physical_to_logical: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """fp32 reference from bf16 inputs, returning the fp32 result (before the final bf16 rounding).

    For token t and slot j with physical expert p = ids[t, j] in [0, E) not masked, e = map[p]:
      g = x W_g[e]^T, u = x W_u[e]^T, h = bf16(silu(g) * u), y = h W_d[e]^T, out_t += w[t, j] * y.
    """
    E = gate.shape[0]
    xf = x.float()
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            p = int(ids[t, j])
            if p < 0 or p >= E:
                continue
            if gpu_experts_mask is not None and bool(gpu_experts_mask[p]):
                continue
            e = p if physical_to_logical is None else int(physical_to_logical[p])
            g = xf[t] @ gate[e].float().T
            u = xf[t] @ up[e].float().T
            h = (torch.nn.functional.silu(g) * u).to(torch.bfloat16).float()
            y = h @ down[e].float().T
            out[t] += float(weights[t, j]) * y
    return out


def reference_quantized_moe(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    quantize_weights: Callable[[torch.Tensor], torch.Tensor],
    quantize_activations: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """fp32 reference of an integer format's forward, given the format's rules as two functions that quantize
    a tensor and return it dequantized in fp32: ``quantize_weights`` (applied to gate/up/down, along their last
    dimension) and ``quantize_activations`` (applied to x and to h, per token).

    For token t and slot j with expert e = ids[t, j] in [0, E):
      g = xq W_gq[e]^T, u = xq W_uq[e]^T, h = bf16(silu(g) * u), y = quantize_activations(h) W_dq[e]^T,
      out_t += w[t, j] * y.
    """
    E = gate.shape[0]
    gq, uq, dq = quantize_weights(gate), quantize_weights(up), quantize_weights(down)
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32)
    xq = quantize_activations(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0 or e >= E:
                continue
            g = xq[t] @ gq[e].T
            u = xq[t] @ uq[e].T
            h = (torch.nn.functional.silu(g) * u).to(torch.bfloat16)
            out[t] += float(weights[t, j]) * (quantize_activations(h) @ dq[e].T)
    return out


def wrapper_args(E: int, k: int, H: int, I: int, **overrides) -> dict:
    """KTMoEWrapper's ten required arguments for a test layer of E experts, top-k, hidden H, intermediate I:
    layer 0, all experts on the CPU, 2 threads in one pool, no weight_path, up to 64 tokens per forward;
    ``overrides`` replaces any of them and adds the optional ones (method, mode, ...)."""
    args = dict(
        layer_idx=0,
        num_experts=E,
        num_experts_per_tok=k,
        hidden_size=H,
        moe_intermediate_size=I,
        gpu_experts_mask=None,
        cpuinfer_threads=2,
        threadpool_count=1,
        weight_path=None,
        chunked_prefill_size=64,
    )
    args.update(overrides)
    return args


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref| (0 when both are all zero)."""
    ref = ref.float()
    err = (out.float() - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    if scale == 0.0:
        return err
    return err / scale


def random_experts(E: int, H: int, I: int, seed: int):
    """Random bf16 gate/up [E, I, H] and down [E, H, I] with unit-variance-preserving scale."""
    gen = torch.Generator().manual_seed(seed)
    gate = (torch.randn(E, I, H, generator=gen) / H**0.5).to(torch.bfloat16)
    up = (torch.randn(E, I, H, generator=gen) / H**0.5).to(torch.bfloat16)
    down = (torch.randn(E, H, I, generator=gen) / I**0.5).to(torch.bfloat16)
    return gate, up, down


def random_routing(qlen: int, H: int, E: int, k: int, seed: int):
    """Random bf16 tokens [qlen, H], distinct expert ids [qlen, k] and softmax weights [qlen, k]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(qlen, H, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(qlen)]).to(torch.int64)
    weights = torch.softmax(torch.randn(qlen, k, generator=gen), dim=-1).to(torch.float32)
    return x, ids.contiguous(), weights.contiguous()
