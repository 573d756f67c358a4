"""KTMoEWrapper(method="AMXINT8" / "MOE_INT8") against PyTorch.

Two references:
- the same int8 computation written in torch (weights quantized per output channel, activations per token,
  both dequantized, then the fp32 forward with h rounded to bf16 before its own quantization): the kernel
  must add nothing to the format's error beyond output rounding (max|err|/max|ref| <= REL_TOL);
- the bf16 model (reference_moe): the format's own error, reported and bounded by the original project's
  accepted mean relative error for INT8 (< 0.05).
"""

from __future__ import annotations

import sys

import pytest
import torch

from kt_kernel import KTMoEWrapper, _native
from moe_reference import REL_TOL, random_experts, random_routing, reference_moe, relative_error
from moe_reference import reference_quantized_moe, wrapper_args

METHODS = ["AMXINT8", "MOE_INT8"]


def quantize_rows(t: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per row (absmax / 127, round half away from zero), returned dequantized in fp32."""
    t = t.float()
    scale = t.abs().amax(dim=-1, keepdim=True) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = t / safe
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-127, 127)
    return torch.where(scale > 0, q * scale, torch.zeros_like(t))


def make(method, E, k, H, I, max_len=64):
    return KTMoEWrapper(**wrapper_args(E, k, H, I, chunked_prefill_size=max_len, method=method))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("E,k,H,I,qlen", [(8, 2, 128, 64, 1), (16, 4, 256, 128, 33), (6, 3, 72, 40, 5)])
def test_matches_int8_reference_and_bf16_model(method, E, k, H, I, qlen):
    gate, up, down = random_experts(E, H, I, seed=7 * E + H)
    moe = make(method, E, k, H, I)
    assert moe.weight_format == "int8"
    moe.load_weights_from_tensors(gate, up, down, None)
    x, ids, w = random_routing(qlen, H, E, k, seed=qlen + 1)
    out = moe.forward(x, ids, w, None)
    # The int8 format in torch: weights per output channel, activations (x and h) per token.
    ref = reference_quantized_moe(x, ids, w, gate, up, down, quantize_rows, quantize_rows)
    err = relative_error(out, ref)
    assert err <= REL_TOL, f"{method}: max|err|/max|ref| vs the int8 reference = {err:.3e}"
    bf16 = reference_moe(x, ids, w, gate, up, down)
    mean_rel = ((out.float() - bf16).abs().mean() / bf16.abs().mean()).item()
    print(f"{method} E={E} k={k} H={H} I={I} qlen={qlen}: mean relative error vs bf16 = {mean_rel:.4f}")
    assert mean_rel < 0.05, f"{method}: mean relative error vs the bf16 model {mean_rel:.4f} >= 0.05"


def test_paths():
    moe = make("AMXINT8", 4, 2, 64, 32)
    assert moe.isa == _native.ISA  # AMX tiles where present, else the best path there is
    general = make("MOE_INT8", 4, 2, 64, 32)
    assert general.isa != "amx" and general.isa == ("avx512_bf16" if _native.ISA == "amx" else _native.ISA)


def test_non_finite_weights_rejected_naming_the_tensor():
    gate, up, down = random_experts(4, 64, 32, seed=1)
    down[2, 5, 7] = float("inf")
    moe = make("AMXINT8", 4, 2, 64, 32)
    with pytest.raises(ValueError, match="down"):
        moe.load_weights_from_tensors(gate, up, down, None)
    assert not moe.weights_loaded


# Bazel runs this file as a script: without this block it would run no test at all (and pass).
if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider"]))
