"""The native int4 checkpoints of testdata/hf (tools/make_fixtures.py imports this; issue 15).

- ``*_rawint4`` (method RAWINT4): the routed experts as compressed-tensors ``pack-quantized`` INT4, packed by
  compressed-tensors itself (its ``calculate_qparams`` for the symmetric group scales, its
  ``PackedQuantizationCompressor.compress`` for ``weight_packed`` int32 [N, K/8], BF16 ``weight_scale``
  [N, K/G] and ``weight_shape``), with the ``quantization_config`` its ``QuantizationConfig`` writes; G = 32
  as Kimi-K2 ships it.
- ``*_gptq`` (method GPTQ_INT4): GPTQ INT4 as AutoGPTQ/GPTQModel write it (``checkpoint_format`` "gptq"),
  packed here from the documented layout, round to nearest (no Hessian: the layout is what is tested):
  ``qweight`` int32 [K/8, N] with k = 8i + j in bits 4j..4j+3 of row i, unsigned q = clamp(round(w / s) + 8,
  0, 15); fp16 ``scales`` [K/G, N] with s = 2 max|w| / 15 per group (GPTQ's symmetric range); ``qzeros``
  int32 [K/G, N/8] holding zero - 1 = 7 per nibble (the v1 format's offset); ``g_idx`` int32 [K] = k // G
  (desc_act false). Weight = (q - 8) * s.

Both return the dequantized float32 weights by the checkpoint's ``.weight`` name, so that the reference is
computed from exactly what the checkpoint holds.
"""

from __future__ import annotations

import json
import os

RAWINT4_GROUP = 32
GPTQ_GROUP = 128


def _rewrite(out_dir: str, convert, quantization_config: dict, model_type=None) -> dict:
    """Replaces every routed expert weight of out_dir/model.safetensors by convert(name, w) -> (tensors
    by suffix, dequantized float32 weight); adds quantization_config to config.json."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = os.path.join(out_dir, "model.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    deq = {}
    for name in list(tensors):
        if ".experts." not in name or not name.endswith("_proj.weight"):
            continue
        parts, d = convert(tensors.pop(name))
        base = name[: -len(".weight")]
        for suffix, t in parts.items():
            tensors[f"{base}.{suffix}"] = t.contiguous()
        deq[name] = d
    save_file(tensors, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config
    if model_type is not None:
        config["model_type"] = model_type
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return deq


def make_rawint4(out_dir: str) -> dict:
    """compressed-tensors pack-quantized INT4 experts (see the module docstring); Kimi-K2's model_type."""
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=RAWINT4_GROUP)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)

    def convert(w):
        n, k = w.shape
        groups = w.float().view(n, k // RAWINT4_GROUP, RAWINT4_GROUP)
        scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        packed = PackedQuantizationCompressor.compress(
            {"weight": w, "weight_scale": scale.to(torch.bfloat16), "weight_zero_point": zp}, scheme)
        # compressed-tensors' own dequantization, in float32 (the bf16 scales are exact in float32).
        state = dict(packed, weight_scale=packed["weight_scale"].float())
        d = PackedQuantizationCompressor.decompress(state, scheme)["weight"].float()
        return {k: packed[k] for k in ("weight_packed", "weight_scale", "weight_shape")}, d

    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                            quantization_status="compressed").model_dump(mode="json")
    return _rewrite(out_dir, convert, qc, model_type="kimi_k2")


def make_gptq(out_dir: str) -> dict:
    """GPTQ INT4 experts, sym, desc_act false, groups of GPTQ_GROUP (see the module docstring)."""
    import torch

    G = GPTQ_GROUP

    def convert(w):
        n, k = w.shape
        wt = w.float().t().contiguous()  # [K, N]: GPTQ's layout is the transposed (in, out) one.
        groups = wt.view(k // G, G, n)
        scale = (2 * groups.abs().amax(1) / 15).to(torch.float16)  # [K/G, N]
        s = scale.float().clamp_min(torch.finfo(torch.float16).tiny)
        q = torch.clamp(torch.round(groups / s[:, None, :]) + 8, 0, 15).to(torch.int64).view(k, n)
        # torch.round is half to even; GPTQ uses torch.round too, so that is the packer's rule.
        shifts = (torch.arange(8, dtype=torch.int64) * 4).view(1, 8, 1)
        qweight = (q.view(k // 8, 8, n) << shifts).sum(1)  # [K/8, N], < 2^32
        qweight = torch.where(qweight < 2**31, qweight, qweight - 2**32).to(torch.int32)
        zeros = torch.full((k // G, n // 8), 0x77777777, dtype=torch.int64).to(torch.int32)
        g_idx = (torch.arange(k, dtype=torch.int32) // G)
        d = ((q.float() - 8) * scale.float().repeat_interleave(G, 0)).t().contiguous()
        return {"qweight": qweight, "scales": scale, "qzeros": zeros, "g_idx": g_idx}, d

    qc = {"quant_method": "gptq", "bits": 4, "group_size": G, "sym": True, "desc_act": False,
          "checkpoint_format": "gptq", "damp_percent": 0.01, "static_groups": False, "true_sequential": True}
    return _rewrite(out_dir, convert, qc)


# The tensors a quantized expert weight is stored as (dropped from the float copy).
QUANT_PARTS = ("weight_packed", "weight_scale", "weight_shape", "qweight", "scales", "qzeros", "g_idx")


def dequantized_config(config: dict) -> dict:
    """config.json for the float32 copy the reference is computed with: no quantization, DeepSeek's own
    model_type (transformers has no kimi_k2 config class)."""
    config = dict(config)
    config.pop("quantization_config", None)
    if config.get("model_type") == "kimi_k2":
        config["model_type"] = "deepseek_v3"
    return config
