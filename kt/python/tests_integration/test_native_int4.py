"""Methods RAWINT4 and GPTQ_INT4 on the native int4 checkpoints of testdata/hf (tools/fixtures_int4.py),
against each format's own decoder (issue 15):

- kimi_k2_rawint4 (compressed-tensors pack-quantized, groups of 32): dequantized by compressed-tensors'
  ``PackedQuantizationCompressor.decompress`` (its scales widened to float32 first, so the oracle's weights
  are q * scale exactly);
- qwen3_moe_gptq (GPTQ sym, groups of 128): dequantized by ``gptq_dequantize`` (native_int4_reference.py),
  written from GPTQ's documented layout (qweight [K/8, N] nibbles along K, qzeros v1 = zero - 1, fp16 scales
  [K/G, N]); the fixture is packed by tools/fixtures_int4.py from the same documentation (a GPTQ packer
  from PyPI was not tried).

kt loads each folder with ``KTMoEWrapper(method=..., weight_path=...).load_weights()`` and its forward is
compared with a float64 MoE over the oracle's weights, on the recorded tokens and routing of
``reference.npz`` (whose ``routed_T``, transformers' float32 output over the same dequantized weights, checks
the float reference itself).

The bound: kt/python/tests/native_int4_reference.py (shared with the Bazel test native_int4_test.py).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from hf_models import TESTDATA_HF

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from native_int4_reference import gptq_dequantize, reference_and_bound  # noqa: E402

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
