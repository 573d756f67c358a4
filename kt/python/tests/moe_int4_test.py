"""KTMoEWrapper int4 methods against PyTorch.

Methods: AMXINT4 / MOE_INT4 (symmetric int4 per output channel, activations int8 per token) and kt's
extensions AMXINT4_1 / MOE_INT4_1 (asymmetric per output channel, the original's INT4_1), AMXINT4_KGroup / MOE_INT4_KGroup (symmetric, a scale per group of G k) and AMXINT4_1KGroup /
MOE_INT4_1KGroup (asymmetric, scale and zero point per group; activations int8 per token and group).

Two references, as for int8:
- the same computation written in torch (weights quantized by the format's rules and dequantized,
  activations quantized per token (and group) and dequantized, fp32 forward with h rounded to bf16 before its
  own quantization): the kernels must add nothing to the format's error beyond output rounding
  (max|err|/max|ref| <= REL_TOL);
- the bf16 model (random weights, and the Hugging Face fixtures' transformers outputs): the format's own
  error, reported and bounded by the original project's accepted mean relative error for INT4 (< 0.35).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from kt_kernel import INFERENCE_METHODS, KT_INFERENCE_EXTENSIONS, KTMoEWrapper, _native
from moe_reference import REL_TOL, random_experts, random_routing, reference_moe, relative_error
from moe_reference import reference_quantized_moe, wrapper_args

# method -> (weight format, uses groups, asymmetric)
METHODS = {
    "AMXINT4": ("int4", False, False),
    "MOE_INT4": ("int4", False, False),
    "AMXINT4_KGroup": ("int4_group_sym", True, False),
    "MOE_INT4_KGroup": ("int4_group_sym", True, False),
    "AMXINT4_1KGroup": ("int4_group_asym", True, True),
    "MOE_INT4_1KGroup": ("int4_group_asym", True, True),
    "AMXINT4_1": ("int4_asym", False, True),
    "MOE_INT4_1": ("int4_asym", False, True),
}
# The original's accepted mean relative error of INT4 experts against the bf16 model.
ORIGINAL_INT4_BOUND = 0.35


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def quantize_sym(t: torch.Tensor, qmax: int, group: int) -> torch.Tensor:
    """Symmetric per row (group == 0) or per group of `group` columns: scale = absmax / qmax (fp32),
    q = clamp(round_half_away(t / scale), -qmax, qmax); returned dequantized (q * scale) in fp32."""
    t = t.float()
    shape = t.shape
    if group:
        t = t.reshape(*shape[:-1], shape[-1] // group, group)
    scale = t.abs().amax(dim=-1, keepdim=True) / float(qmax)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = round_half_away(t / safe).clamp(-qmax, qmax)
    return torch.where(scale > 0, q * scale, torch.zeros_like(t)).reshape(shape)


def quantize_asym4(t: torch.Tensor, group: int) -> torch.Tensor:
    """kt-int4-group{G}-asym-v1 (docs/FORMATS.md): range widened to contain 0, scale = (hi - lo) / 15 in
    double rounded to fp32, z = clamp(round(-lo / scale), 0, 15), q = clamp(round(t / scale) + z, 0, 15);
    returned dequantized ((q - z) * scale). Constant groups are not produced by random weights."""
    t = t.float()
    shape = t.shape
    group = group or shape[-1]  # 0: one group per row (kt-int4-channel-asym-v1)
    t = t.reshape(*shape[:-1], shape[-1] // group, group)
    lo = t.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = t.amax(dim=-1, keepdim=True).clamp(min=0.0)
    scale = ((hi.double() - lo.double()) / 15.0).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    z = round_half_away(-lo / safe).clamp(0, 15)
    q = (round_half_away(t / safe) + z).clamp(0, 15)
    return torch.where(scale > 0, (q - z) * scale, torch.zeros_like(t)).reshape(shape)


def reference_int4(method, group, x, ids, weights, gate, up, down):
    """The method's format applied in torch, fp32 forward (h rounded to bf16 before its quantization)."""
    _, grouped, asym = METHODS[method]
    g = group if grouped else 0
    if asym:
        wq = lambda w: quantize_asym4(w, g)  # noqa: E731
    else:
        wq = lambda w: quantize_sym(w, 7, g)  # noqa: E731
    aq = lambda a: quantize_sym(a, 127, g)  # noqa: E731
    return reference_quantized_moe(x, ids, weights, gate, up, down, wq, aq)


def make(method, E, k, H, I, max_len=64, group_size=128):
    return KTMoEWrapper(
        **wrapper_args(E, k, H, I, chunked_prefill_size=max_len, method=method, group_size=group_size)
    )


def mean_relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().mean() / ref.float().abs().mean()).item()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(
    "E,k,H,I,qlen,group", [(8, 2, 128, 64, 1, 64), (16, 4, 256, 128, 33, 128), (6, 3, 96, 64, 5, 32)]
)
def test_matches_format_reference_and_bf16_model(method, E, k, H, I, qlen, group):
    gate, up, down = random_experts(E, H, I, seed=7 * E + H)
    moe = make(method, E, k, H, I, group_size=group)
    fmt, grouped, _ = METHODS[method]
    assert moe.weight_format == fmt
    assert moe.group_size == (group if grouped else 0)
    moe.load_weights_from_tensors(gate, up, down, None)
    x, ids, w = random_routing(qlen, H, E, k, seed=qlen + 1)
    out = moe.forward(x, ids, w, None)
    err = relative_error(out, reference_int4(method, group, x, ids, w, gate, up, down))
    # Same bound as int8 (moe_reference.REL_TOL): the integer sums are exact, so only the output's bf16
    # rounding and the occasional flip of one bf16 h element (and thus its int8 step) remain.
    assert err <= REL_TOL, f"{method}: max|err|/max|ref| vs the {fmt} reference = {err:.3e}"
    mean_rel = mean_relative_error(out, reference_moe(x, ids, w, gate, up, down))
    print(f"{method} G={group} E={E} k={k} H={H} I={I} qlen={qlen}: mean relative error vs bf16 = {mean_rel:.4f}")
    assert mean_rel < ORIGINAL_INT4_BOUND, f"{method}: mean relative error vs bf16 {mean_rel:.4f}"


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("method", ["AMXINT4", "AMXINT4_1", "AMXINT4_KGroup", "AMXINT4_1KGroup"])
def test_format_error_on_hf_fixtures(arch, method):
    """The int4 formats on real (tiny) checkpoints against transformers' routed-experts output."""
    import testdata

    E, k, H, I = testdata.shape(arch)
    ref = testdata.reference(arch)
    gate, up, down = testdata.stacked_experts(arch, int(ref["layer"]))
    group = 128 if H % 128 == 0 and I % 128 == 0 else 32
    moe = make(method, E, k, H, I, max_len=33, group_size=group)
    moe.load_weights_from_tensors(gate, up, down, None)
    for T in testdata.TOKENS:
        x, ids, w, expected = testdata.inputs(ref, T)
        out = moe.forward(x, ids, w, None)
        own = relative_error(out, reference_int4(method, group, x, ids, w, gate, up, down))
        assert own <= REL_TOL, f"{arch} {method} T={T}: max|err|/max|ref| vs the format reference = {own:.3e}"
        mean_rel = mean_relative_error(out, expected)
        print(f"{arch} {method} G={group} T={T}: mean relative error vs transformers = {mean_rel:.4f}")
        assert mean_rel < ORIGINAL_INT4_BOUND, f"{arch} {method} T={T}: {mean_rel:.4f}"


def test_paths_and_names():
    assert "AMXINT4" in INFERENCE_METHODS and "MOE_INT4" in INFERENCE_METHODS
    assert len(INFERENCE_METHODS) == 10  # the original's list is unchanged
    assert not (KT_INFERENCE_EXTENSIONS & INFERENCE_METHODS)
    amx = make("AMXINT4", 4, 2, 64, 32)
    assert amx.isa == _native.ISA  # AMX tiles where present, else the best path there is
    for method in ["MOE_INT4", "MOE_INT4_1", "MOE_INT4_KGroup", "MOE_INT4_1KGroup"]:
        general = make(method, 4, 2, 64, 32, group_size=32)
        assert general.isa != "amx" and general.isa == ("avx512_bf16" if _native.ISA == "amx" else _native.ISA)


def test_portable_and_amx_methods_agree_bit_for_bit():
    """Every kernel path computes the same integer sums and fp32 epilogue: AMX* and MOE_* outputs match."""
    gate, up, down = random_experts(6, 128, 64, seed=3)
    x, ids, w = random_routing(20, 128, 6, 2, seed=4)
    for amx, general in [("AMXINT4", "MOE_INT4"), ("AMXINT4_1", "MOE_INT4_1"), ("AMXINT4_1KGroup", "MOE_INT4_1KGroup")]:
        a, b = make(amx, 6, 2, 128, 64, group_size=64), make(general, 6, 2, 128, 64, group_size=64)
        a.load_weights_from_tensors(gate, up, down, None)
        b.load_weights_from_tensors(gate, up, down, None)
        assert torch.equal(a.forward(x, ids, w, None), b.forward(x, ids, w, None)), amx


_PATH_PROBE = """
import hashlib, sys, torch, kt_kernel
from moe_reference import random_experts, random_routing
out = []
for method, g in [("AMXINT4", 128), ("AMXINT4_1", 128), ("AMXINT4_KGroup", 32), ("AMXINT4_1KGroup", 64)]:
    m = kt_kernel.KTMoEWrapper(0, 6, 2, 128, 64, None, 2, 1, None, 24, method=method, group_size=g)
    gate, up, down = random_experts(6, 128, 64, seed=11)
    m.load_weights_from_tensors(gate, up, down, None)
    x, ids, w = random_routing(19, 128, 6, 2, seed=12)
    y = m.forward(x, ids, w, None)
    out.append(method + ":" + hashlib.sha256(y.view(torch.int16).numpy().tobytes()).hexdigest())
print(kt_kernel.__cpu_variant__, " ".join(out))
"""


def test_every_kernel_path_gives_the_same_bits():
    """Through KT_ISA, each path this CPU has (scalar, avx2, ... amx) must produce identical outputs: the
    integer sums are exact and the fp32 epilogue is the same expression on every path."""
    import subprocess

    results = {}
    for isa in ("scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"):
        if not _native._kt.isa_supported(isa):
            continue
        env = dict(os.environ, KT_ISA=isa)
        r = subprocess.run([sys.executable, "-c", _PATH_PROBE], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"KT_ISA={isa}: {r.stderr}"
        variant, digests = r.stdout.strip().split(" ", 1)
        assert variant == isa
        results[isa] = digests
    assert "scalar" in results and len(results) >= 2, results  # scalar and at least the best SIMD path
    assert len(set(results.values())) == 1, results


def test_bad_group_size_and_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128"):
        make("AMXINT4_KGroup", 4, 2, 64, 32, group_size=48)
    with pytest.raises(ValueError, match="intermediate = 32 must be a multiple of group_size = 64"):
        make("AMXINT4_1KGroup", 4, 2, 64, 32, group_size=64)
    # Per-channel methods ignore group_size.
    assert make("AMXINT4", 4, 2, 64, 32, group_size=48).group_size == 0


def test_non_finite_weights_rejected_naming_the_tensor():
    gate, up, down = random_experts(4, 64, 32, seed=1)
    up[1, 3, 2] = float("nan")
    moe = make("AMXINT4_1KGroup", 4, 2, 64, 32, group_size=32)
    with pytest.raises(ValueError, match="up"):
        moe.load_weights_from_tensors(gate, up, down, None)
    assert not moe.weights_loaded


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider"]))
