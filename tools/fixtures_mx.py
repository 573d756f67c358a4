"""The OCP MX checkpoints of testdata/hf (tools/make_fixtures.py calls these; run that script, not this file):
DeepSeek-V4-Flash's MXFP4 and MiniMax-M3's MXFP8 routed experts, written as their makers ship them, each with a
numpy quantizer and dequantizer written from the OCP MX v1.0 specification and a reference.npz of transformers'
own experts module over the dequantized weights."""

from __future__ import annotations

import json
import os


def mx_quantize(w, fp4: bool = True):
    """OCP MX v1.0 of w [..., K] (numpy float64): shared exponent floor(log2(amax)) - emax per 32 k, elements
    rounded to the nearest value (ties to the even code) and saturated. Returns codes (fp4: E2M1 nibble pairs
    [..., K/2], element 2i in the low nibble) and E8M0 codes [..., K/32]."""
    import numpy as np

    grid = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    blocks = w.reshape(*w.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(axis=-1)
    shared = np.clip(np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, 0), -127, 127)
    a = np.abs(blocks / 2.0 ** shared[..., None])
    idx = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo, hi = grid[idx - 1], grid[idx]
    up = (a - lo > hi - a) | ((a - lo == hi - a) & (idx % 2 == 0))
    mag = np.where(a >= grid[-1], len(grid) - 1, np.where(up, idx, idx - 1))
    nib = (mag | (((blocks < 0) & (mag > 0)) << 3)).astype(np.uint8).reshape(*w.shape[:-1], -1)
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8), (shared + 127).astype(np.uint8)


def make_deepseek_v4_mxfp4(out_dir: str, seed: int, tokens) -> None:
    """DeepSeek-V4-Flash's routed experts as DeepSeek ships them: `layers.L.ffn.experts.e.{w1,w3,w2}.weight`
    I8 [N, K/2] (MXFP4 nibble pairs) + `.scale` F8_E8M0 [N, K/32], with transformers' DeepseekV4Config and
    the quantization_config of the FP8 (block, ue8m0) non-expert weights. Only the routed experts are
    written (the rest of V4's graph is not kt's). reference.npz: random tokens, routing and weights, and
    transformers' DeepseekV4Experts (SiLU with the config's swiglu_limit clamp) in float32 over the weights
    dequantized by transformers' MXFP4 integration (convert_moe_packed_tensors)."""
    import numpy as np
    import torch
    import transformers as tf
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Experts

    E, H, I, k, layers = 8, 128, 64, 2, 2
    config = tf.DeepseekV4Config(vocab_size=64, hidden_size=H, moe_intermediate_size=I, num_hidden_layers=layers,
                                 n_routed_experts=E, num_experts_per_tok=k, swiglu_limit=1.0)
    cfg = config.to_dict()
    cfg["architectures"] = ["DeepseekV4ForCausalLM"]
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    rng = np.random.default_rng(seed)
    tensors, deq = {}, {}
    for layer in range(layers):
        for e in range(E):
            for proj, (n, kk) in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
                # Magnitudes vary by 32-block so that the shared exponents differ.
                w = rng.standard_normal((n, kk)) * np.repeat(2.0 ** rng.uniform(-3, 0, (n, kk // 32)), 32, axis=1)
                w = torch.from_numpy(w / np.sqrt(kk) * 4).to(torch.bfloat16).double().numpy()
                codes, scales = mx_quantize(w)
                name = f"layers.{layer}.ffn.experts.{e}.{proj}"
                tensors[name + ".weight"] = torch.from_numpy(codes).view(torch.int8)
                tensors[name + ".scale"] = torch.from_numpy(scales).view(torch.float8_e8m0fnu)
                deq[(layer, e, proj)] = convert_moe_packed_tensors(
                    torch.from_numpy(codes).reshape(1, n, kk // 32, 16), torch.from_numpy(scales).reshape(1, n, -1),
                    dtype=torch.float32)[0].transpose(0, 1)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    experts = DeepseekV4Experts(config).eval()
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.stack([torch.cat([deq[(0, e, "w1")], deq[(0, e, "w3")]]) for e in range(E)]))
        experts.down_proj.copy_(torch.stack([deq[(0, e, "w2")] for e in range(E)]))
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for T in tokens:
        x = torch.randn(T, H, generator=g).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        wts = torch.rand(T, k, generator=g) + 0.1
        with torch.no_grad():
            routed = experts(x.float(), ids, wts)
        out.update({f"x_{T}": x.float().numpy(), f"ids_{T}": ids.numpy(), f"weights_{T}": wts.numpy(),
                    f"routed_{T}": routed.numpy(), f"block_{T}": routed.numpy()})
    np.savez_compressed(os.path.join(out_dir, "reference.npz"), layer=np.int64(0), **out)


def e4m3_values():
    """The 256 E4M3 ("e4m3fn") codes' values from the format's definition (numpy float64; NaN for s.1111.111)."""
    import numpy as np

    c = np.arange(256)
    e, m = (c >> 3) & 15, (c & 7).astype(np.float64)
    mag = np.where(e == 0, m * 2.0 ** -9, (1 + m / 8) * 2.0 ** (e - 7))
    mag = np.where((e == 15) & (m == 7), np.nan, mag)
    return np.where(c >> 7, -mag, mag)


def mxfp8_quantize(w):
    """OCP MX v1.0 MXFP8 of w [..., K] (numpy float64): shared exponent floor(log2(amax)) - 8 per 32 k, elements
    w / 2^shared rounded to the nearest E4M3 value (ties to even: torch's float8 cast) after saturating at 448.
    Returns the E4M3 codes (uint8 [..., K]) and the E8M0 codes (uint8 [..., K/32])."""
    import numpy as np
    import torch

    blocks = w.reshape(*w.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(axis=-1)
    shared = np.clip(np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 8, 0), -127, 127)
    a = np.clip(blocks / 2.0 ** shared[..., None], -448, 448).reshape(w.shape)
    codes = torch.from_numpy(a).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return codes, (shared + 127).astype(np.uint8)


def make_minimax_m3_mxfp8(out_dir: str, seed: int, tokens, vision: dict) -> None:
    """MiniMax-M3-MXFP8's routed experts as MiniMax ships them (the names transformers' conversion_mapping
    renames on load): `language_model.model.layers.L.block_sparse_moe.experts.e.{w1,w3,w2}.weight` F8_E4M3
    [N, K] + `.weight_scale_inv` U8 E8M0 [N, K/32], with transformers' MiniMaxM3VLConfig (architecture
    MiniMaxM3SparseForConditionalGeneration, text_config with moe_layer_freq [0, 1, 1] as the released config
    states the dense layers, swiglu_alpha 1.702 and swiglu_limit 2.0 so that the clamp bites). Only the
    routed experts are written; no quantization_config (the release's was not checked: kt reads MX-coded
    experts as stored whatever it says). reference.npz: transformers' MiniMaxM3VLExperts (swigluoai) in
    float32 over the weights dequantized by the E4M3 and E8M0 definitions (numpy)."""
    import numpy as np
    import torch
    import transformers as tf
    from safetensors.torch import save_file
    from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLExperts

    E, H, I, k, layers = 8, 128, 64, 2, 3
    text = dict(vocab_size=64, hidden_size=H, intermediate_size=I, num_hidden_layers=layers, num_local_experts=E,
                num_experts_per_tok=k, shared_intermediate_size=I, dense_intermediate_size=2 * I,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, swiglu_alpha=1.702, swiglu_limit=2.0)
    config = tf.MiniMaxM3VLConfig(text_config=dict(text), vision_config=vision)
    cfg = config.to_dict()
    cfg["architectures"] = ["MiniMaxM3SparseForConditionalGeneration"]
    cfg["text_config"].pop("mlp_layer_types", None)
    cfg["text_config"]["moe_layer_freq"] = [0, 1, 1]
    cfg["text_config"]["scoring_func"] = "sigmoid"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    rng = np.random.default_rng(seed)
    lut = e4m3_values()
    tensors, deq = {}, {}
    for layer in (1, 2):
        for e in range(E):
            for proj, (n, kk) in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
                w = rng.standard_normal((n, kk)) * np.repeat(2.0 ** rng.uniform(-3, 0, (n, kk // 32)), 32, axis=1)
                codes, scales = mxfp8_quantize(w / np.sqrt(kk) * 4)
                name = f"language_model.model.layers.{layer}.block_sparse_moe.experts.{e}.{proj}"
                tensors[name + ".weight"] = torch.from_numpy(codes).view(torch.float8_e4m3fn)
                tensors[name + ".weight_scale_inv"] = torch.from_numpy(scales)
                deq[(layer, e, proj)] = torch.from_numpy(
                    lut[codes] * np.repeat(2.0 ** (scales.astype(np.float64) - 127), 32, axis=1)).float()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    experts = MiniMaxM3VLExperts(config.text_config).eval()
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.stack([torch.cat([deq[(1, e, "w1")], deq[(1, e, "w3")]]) for e in range(E)]))
        experts.down_proj.copy_(torch.stack([deq[(1, e, "w2")] for e in range(E)]))
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for T in tokens:
        x = torch.randn(T, H, generator=g).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        wts = torch.rand(T, k, generator=g) + 0.1
        with torch.no_grad():
            routed = experts(x.float(), ids, wts)
        out.update({f"x_{T}": x.float().numpy(), f"ids_{T}": ids.numpy(), f"weights_{T}": wts.numpy(),
                    f"routed_{T}": routed.numpy(), f"block_{T}": routed.numpy()})
    np.savez_compressed(os.path.join(out_dir, "reference.npz"), layer=np.int64(1), **out)
