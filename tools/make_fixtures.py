#!/usr/bin/env python3
"""Builds kt's test checkpoints (testdata/hf/) with transformers itself.

For every MoE family kt maps, a tiny randomly initialised model is made from its config class and saved with
`save_pretrained` (safetensors, bf16), so tensor names, layouts and config.json are exactly what
transformers writes for the real models. Beside each checkpoint, `reference.npz` records what transformers
computes for the first MoE layer's block, for T = 1, 7 and 33 tokens:

  layer        the decoder layer index of that block
  x_T          input hidden states [T, H] (bf16 values, stored as float32: exact)
  ids_T        int64 [T, k] expert ids chosen by the model's own router
  weights_T    float32 [T, k] routing weights as the block hands them to its experts (any routed scaling
               factor already folded in)
  routed_T     float32 [T, H]: the routed experts' weighted sum, as transformers' experts module returns it
               (what kt's MoE forward must return)
  block_T      float32 [T, H]: the whole MoE block's output (shared experts included where the model has them)

`deepseek_v3_fp8` stores its routed experts as FP8 E4M3 with one float32 `weight_scale_inv` per 128x128
block, as DeepSeek ships them; its `routed_T`/`block_T` are computed by transformers in float32 from the
dequantized weights (fp8 value x block scale), the exact target of an FP8 path. `glm4_moe_channel_fp8` does
the same with one BF16 `weight_scale` [N, 1] per output channel (GLM-4.x FP8, compressed-tensors).

Usage:  tools/make_fixtures.py [--out testdata/hf] [--only NAME ...]
The script makes a virtualenv (.venv-fixtures, or $KT_FIXTURE_VENV) with the pinned packages below from PyPI
on first use and re-runs itself inside it; the tests need only the committed output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zlib

import fixtures_int4  # noqa: E402 (beside this script: the native int4 checkpoints)
import fixtures_mx  # noqa: E402 (beside this script: the OCP MX checkpoints)

PINNED = ["torch==2.15.0", "transformers==5.17.0", "safetensors==0.8.0", "numpy==2.4.6",
          "compressed-tensors==0.20.1"]
TOKENS = (1, 7, 33)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_venv() -> None:
    """Re-executes this script in the fixture virtualenv, creating it first if needed."""
    venv = os.environ.get("KT_FIXTURE_VENV", os.path.join(REPO, ".venv-fixtures"))
    python = os.path.join(venv, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(venv):
        return
    if not os.path.exists(python):
        print(f"make_fixtures: creating {venv} with {' '.join(PINNED)}", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "venv", venv])
        subprocess.check_call([python, "-m", "pip", "install", "-q", *PINNED])
    os.execv(python, [python, os.path.abspath(__file__), *sys.argv[1:]])


# ---- The checkpoints ------------------------------------------------------------------------------------
# Small shapes: H = 64, I = 32, E = 8, top-2 for most; qwen3_moe and mixtral use H = I = 128 so that the
# group-wise int4 formats (groups of up to 128 along both H and I) run on them; the FP8 one has H = 256,
# I = 128 (E = 4) so that its 128x128 scale blocks tile each matrix more than once.

ATTN = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=64,
            max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.1)


def tiny_vision(cls_kwargs: dict) -> dict:
    return dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64,
                patch_size=8, spatial_merge_size=1, temporal_patch_size=1, **cls_kwargs)


def deepseek_mla() -> dict:
    return dict(kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)


def specs():
    """name -> (config factory, model class name, whether the model keeps its MoE keys in text_config)."""
    import transformers as tf

    def qwen35_text(**kw):
        return dict(ATTN, hidden_size=64, num_hidden_layers=1, layer_types=["full_attention"],
                    moe_intermediate_size=48, shared_expert_intermediate_size=32, num_experts=8,
                    num_experts_per_tok=2, linear_num_key_heads=2, linear_num_value_heads=2,
                    linear_key_head_dim=16, linear_value_head_dim=16, **kw)

    def deepseek_moe(mla=True, **kw):
        """DeepSeek-style config kwargs: a dense layer 0, then one MoE layer with a shared expert; `kw`
        overrides (first_k_dense_replace=None leaves it out, for configs that do not take it)."""
        args = dict(ATTN, **(deepseek_mla() if mla else {}), hidden_size=64, intermediate_size=64,
                    num_hidden_layers=2, first_k_dense_replace=1, moe_intermediate_size=32, n_routed_experts=8,
                    n_shared_experts=1, num_experts_per_tok=2, norm_topk_prob=True)
        args.update(kw)
        return {k: v for k, v in args.items() if v is not None}

    dsa_indexer = dict(index_topk=16, index_head_dim=32, index_n_heads=2)

    def vl_text(**kw):
        return dict(ATTN, hidden_size=64, num_hidden_layers=1, moe_intermediate_size=48, intermediate_size=64,
                    num_experts=8, num_experts_per_tok=2, **kw)

    return {
        "qwen2_moe": (lambda: tf.Qwen2MoeConfig(
            **ATTN, hidden_size=64, intermediate_size=64, num_hidden_layers=1, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
            "Qwen2MoeForCausalLM"),
        "qwen3_moe": (lambda: tf.Qwen3MoeConfig(
            **ATTN, hidden_size=128, intermediate_size=128, num_hidden_layers=1, moe_intermediate_size=128,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
            "Qwen3MoeForCausalLM"),
        # GPTQ INT4 (sym, groups of 128) on a Qwen3-MoE layer: groups of 128 along H and I.
        "qwen3_moe_gptq": (lambda: tf.Qwen3MoeConfig(
            **ATTN, hidden_size=256, intermediate_size=128, num_hidden_layers=1, moe_intermediate_size=128,
            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
            "Qwen3MoeForCausalLM"),
        "qwen3_next": (lambda: tf.Qwen3NextConfig(
            **ATTN, hidden_size=64, intermediate_size=64, num_hidden_layers=1, layer_types=["full_attention"],
            moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8,
            num_experts_per_tok=2, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
            linear_value_head_dim=16),
            "Qwen3NextForCausalLM"),
        "qwen3_5_moe": (lambda: tf.Qwen3_5MoeConfig(
            text_config=qwen35_text(), vision_config=tiny_vision({})),
            "Qwen3_5MoeForConditionalGeneration"),
        "qwen3_5_moe_text": (lambda: tf.Qwen3_5MoeTextConfig(**qwen35_text()), "Qwen3_5MoeForCausalLM"),
        "qwen3_vl_moe": (lambda: tf.Qwen3VLMoeConfig(
            text_config=vl_text(), vision_config=tiny_vision(dict(deepstack_visual_indexes=[]))),
            "Qwen3VLMoeForConditionalGeneration"),
        "qwen3_vl_moe_resaved": (lambda: tf.Qwen3VLMoeConfig(
            text_config=vl_text(), vision_config=tiny_vision(dict(deepstack_visual_indexes=[]))),
            "Qwen3VLMoeForConditionalGeneration"),
        "deepseek_v2": (lambda: tf.DeepseekV2Config(**deepseek_moe(
            topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0,
            norm_topk_prob=False)), "DeepseekV2ForCausalLM"),
        "deepseek_v3": (lambda: tf.DeepseekV3Config(**deepseek_moe(
            n_group=4, topk_group=2, routed_scaling_factor=2.5)), "DeepseekV3ForCausalLM"),
        "deepseek_v3_fp8": (lambda: tf.DeepseekV3Config(**deepseek_moe(
            hidden_size=256, moe_intermediate_size=128, n_routed_experts=4, n_group=2, topk_group=1,
            routed_scaling_factor=2.5)), "DeepseekV3ForCausalLM"),
        # Kimi-K2's INT4 (compressed-tensors pack-quantized, groups of 32) on a DeepSeek-V3 layer.
        "kimi_k2_rawint4": (lambda: tf.DeepseekV3Config(**deepseek_moe(
            hidden_size=128, moe_intermediate_size=64, n_routed_experts=4, n_group=2, topk_group=1,
            routed_scaling_factor=2.5)), "DeepseekV3ForCausalLM"),
        "deepseek_v32": (lambda: tf.DeepseekV32Config(**deepseek_moe(
            n_group=4, topk_group=2, routed_scaling_factor=2.5, **dsa_indexer)), "DeepseekV32ForCausalLM"),
        "glm4_moe_lite": (lambda: tf.Glm4MoeLiteConfig(**deepseek_moe(
            first_k_dense_replace=None, n_group=1, topk_group=1, routed_scaling_factor=1.8)),
            "Glm4MoeLiteForCausalLM"),
        "glm_moe_dsa": (lambda: tf.GlmMoeDsaConfig(**deepseek_moe(
            n_group=1, topk_group=1, routed_scaling_factor=2.5, **dsa_indexer)), "GlmMoeDsaForCausalLM"),
        "glm4_moe": (lambda: tf.Glm4MoeConfig(**deepseek_moe(
            mla=False, n_group=1, topk_group=1, routed_scaling_factor=2.5)), "Glm4MoeForCausalLM"),
        "glm4_moe_channel_fp8": (lambda: tf.Glm4MoeConfig(**deepseek_moe(
            mla=False, n_group=1, topk_group=1, routed_scaling_factor=2.5)), "Glm4MoeForCausalLM"),
        "glm4v_moe": (lambda: tf.Glm4vMoeConfig(
            text_config=dict(ATTN, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                             first_k_dense_replace=1, moe_intermediate_size=32, n_routed_experts=8,
                             n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                             routed_scaling_factor=2.5, norm_topk_prob=True),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64,
                               patch_size=8, spatial_merge_size=1, temporal_patch_size=1)),
            "Glm4vMoeForConditionalGeneration"),
        "mixtral": (lambda: tf.MixtralConfig(
            **ATTN, hidden_size=128, intermediate_size=128, num_hidden_layers=1, num_local_experts=8,
            num_experts_per_tok=2),
            "MixtralForCausalLM"),
        "minimax": (lambda: tf.MiniMaxConfig(
            **ATTN, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_local_experts=8,
            num_experts_per_tok=2, layer_types=["full_attention"], bos_token_id=None, eos_token_id=None),
            "MiniMaxForCausalLM"),
        "minimax_m2": (lambda: tf.MiniMaxM2Config(
            **ATTN, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_local_experts=8,
            num_experts_per_tok=2, bos_token_id=None, eos_token_id=None),
            "MiniMaxM2ForCausalLM"),
    }


# Checkpoints written as the model's publisher ships them instead of as save_pretrained re-saves them.
# Qwen3.5-MoE ships its experts fused (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]), which
# transformers loads as is but re-saves per expert (qwen3_5_moe_text is that per-expert form). Qwen3-VL-MoE
# ships them transposed (gate_up_proj [E, H, 2I], down_proj [E, I, H]), which transformers transposes on
# load but re-saves in its own [E, 2I, H] / [E, H, I] order (qwen3_vl_moe_resaved is that form).
# Either way transformers loads the folder back into the same parameters (check_round_trip).
AS_SHIPPED = {"qwen3_5_moe": "model", "qwen3_vl_moe": "transposed"}


def save_as_shipped(model, out_dir: str, how: str) -> None:
    """config.json from the model, and model.safetensors with the model's own parameter names, the fused
    expert tensors transposed to [E, H, 2I] / [E, I, H] when `how` is "transposed"."""
    from safetensors.torch import save_file

    model.config.architectures = [type(model).__name__]  # save_pretrained of the model would set it.
    model.config.save_pretrained(out_dir)
    tensors = {}
    for k, v in model.state_dict().items():
        fused = k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj")
        tensors[k] = (v.transpose(1, 2) if fused and how == "transposed" else v).detach().contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def check_round_trip(model, out_dir: str, cls_name: str) -> None:
    """transformers loads the saved folder back into the same parameters (names, layout and values)."""
    import torch

    again = model_class(cls_name).from_pretrained(out_dir, dtype=torch.bfloat16)
    ours, theirs = model.state_dict(), again.state_dict()
    if set(ours) != set(theirs):
        raise RuntimeError(f"{out_dir}: reloaded parameter names differ: {sorted(set(ours) ^ set(theirs))[:4]}")
    for k, v in ours.items():
        if not torch.equal(v, theirs[k]):
            raise RuntimeError(f"{out_dir}: {k} differs after save and reload")


def model_class(name: str):
    import transformers as tf

    return getattr(tf, name)


def moe_blocks(model):
    """(layer index, block, experts module) of every MoE block, in layer order."""
    import torch

    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if experts is None or not isinstance(experts, torch.nn.Module) or not hasattr(module, "gate"):
            continue
        parts = name.split(".")
        layer = int(parts[parts.index("layers") + 1])
        found.append((layer, module, experts))
    return sorted(found, key=lambda t: t[0])


def record(block, experts, H: int, seed: int):
    """Runs the block for each T and returns the reference arrays (see the module docstring)."""
    import numpy as np
    import torch

    out = {}
    dtype = next(block.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    for T in TOKENS:
        x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
        captured = {}

        def hook(module, args, output):
            captured["ids"], captured["weights"] = args[1], args[2]
            captured["routed"] = output

        handle = experts.register_forward_hook(hook)
        with torch.no_grad():
            y = block(x.to(dtype).view(1, T, H))
        handle.remove()
        if isinstance(y, tuple):
            y = y[0]
        out[f"x_{T}"] = x.float().numpy()
        out[f"ids_{T}"] = captured["ids"].reshape(T, -1).to(torch.int64).numpy()
        out[f"weights_{T}"] = captured["weights"].reshape(T, -1).float().numpy()
        out[f"routed_{T}"] = captured["routed"].reshape(T, H).float().numpy()
        out[f"block_{T}"] = y.reshape(T, H).float().numpy()
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def to_fp8_blocks(w, block: int = 128):
    """FP8 E4M3 weights and float32 scale_inv per block x block tile, as DeepSeek's checkpoints hold them."""
    import torch

    rows, cols = w.shape
    br, bc = -(-rows // block), -(-cols // block)
    scale = torch.empty(br, bc, dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    wf = w.float()
    for i in range(br):
        for j in range(bc):
            tile = wf[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = float(tile.abs().max()) / 448.0 or 1.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    deq = q.float() * scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return q, scale, deq


def to_fp8_channels(w):
    """FP8 E4M3 weights and a BF16 weight_scale [N, 1] per output row (amax / 448, rounded to bf16 as
    llm-compressor keeps the model's dtype), as GLM-4.x FP8 (compressed-tensors, strategy "channel") holds
    them. The dequantized weights are plain torch: fp8.float() * scale.float()."""
    import torch

    wf = w.float()
    scale = (wf.abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=2**-20).to(torch.bfloat16)
    q = (wf / scale.float()).to(torch.float8_e4m3fn)
    return q, scale, q.float() * scale.float()


# FP8 checkpoints: the block-scaled one DeepSeek ships, and the per-channel one of GLM-4.x FP8.
FP8_KIND = {"deepseek_v3_fp8": "block", "glm4_moe_channel_fp8": "channel"}

CHANNEL_QUANT_CONFIG = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["re:.*mlp\\.experts\\.\\d+\\.(gate|up|down)_proj$"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True}}},
    "ignore": ["lm_head"],
}


def make_fp8(out_dir: str, kind: str = "block") -> dict:
    """Rewrites the saved checkpoint's routed experts as FP8 with 128x128 block scales (kind "block") or
    per-channel scales ("channel"); returns the dequantized weights by tensor name so the reference can be
    computed from them."""
    import torch
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
        if kind == "block":
            q, scale, d = to_fp8_blocks(tensors[name])
            tensors[name + "_scale_inv"] = scale
        else:
            q, scale, d = to_fp8_channels(tensors[name])
            tensors[name + "_scale"] = scale
        tensors[name] = q
        deq[name] = d
    save_file(tensors, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    if kind == "block":
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    else:
        config["quantization_config"] = CHANNEL_QUANT_CONFIG
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return deq


def dequantized_float_model(fp8_dir: str, cls_name: str, deq: dict):
    """The checkpoint in fp8_dir loaded by transformers in float32 with its FP8 experts replaced by their
    dequantized values (written to a temporary folder under the original names, so that transformers maps
    them onto its own expert layout itself)."""
    import tempfile

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        with safe_open(os.path.join(fp8_dir, "model.safetensors"), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()
                       if not k.endswith(("_scale_inv", "_scale"))
                       and k.rsplit(".", 1)[-1] not in fixtures_int4.QUANT_PARTS}
            meta = f.metadata()
        for n, d in deq.items():
            tensors[n] = d.contiguous()
        for n, t in tensors.items():
            if t.is_floating_point() and n not in deq:
                tensors[n] = t.float()
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata=meta)
        with open(os.path.join(fp8_dir, "config.json")) as f:
            config = fixtures_int4.dequantized_config(json.load(f))
        config["dtype"] = "float32"
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f)
        return model_class(cls_name).from_pretrained(tmp, dtype=torch.float32).eval()


# Checkpoints not made by building the whole transformers model (only the routed experts matter to kt).
CUSTOM = {
    "deepseek_v4_mxfp4": lambda out_dir, seed: fixtures_mx.make_deepseek_v4_mxfp4(out_dir, seed, TOKENS),
    "minimax_m3_mxfp8": lambda out_dir, seed: fixtures_mx.make_minimax_m3_mxfp8(out_dir, seed, TOKENS,
                                                                                tiny_vision({})),
}


def make(name: str, out_root: str, seed: int) -> None:
    import numpy as np
    import torch

    if name in CUSTOM:
        out_dir = os.path.join(out_root, name)
        os.makedirs(out_dir, exist_ok=True)
        for f in os.listdir(out_dir):
            os.remove(os.path.join(out_dir, f))
        CUSTOM[name](out_dir, seed)
        print(f"{name}: {sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir)) // 1024} KiB")
        return

    factory, cls_name = specs()[name]
    config = factory()
    torch.manual_seed(seed)
    model = model_class(cls_name)(config).to(torch.bfloat16).eval()
    out_dir = os.path.join(out_root, name)
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        os.remove(os.path.join(out_dir, f))
    if name in AS_SHIPPED:
        save_as_shipped(model, out_dir, AS_SHIPPED[name])
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    check_round_trip(model, out_dir, cls_name)
    gen_cfg = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)

    layer, block, experts = moe_blocks(model)[0]
    H = config.get_text_config().hidden_size
    quantizers = {"_rawint4": fixtures_int4.make_rawint4, "_gptq": fixtures_int4.make_gptq}
    quantize = next((q for suffix, q in quantizers.items() if name.endswith(suffix)), None)
    if name in FP8_KIND:
        quantize = lambda d: make_fp8(d, FP8_KIND[name])  # noqa: E731
    if quantize is not None:
        deq = quantize(out_dir)
        model = dequantized_float_model(out_dir, cls_name, deq)
        layer, block, experts = moe_blocks(model)[0]
    ref = record(block, experts, H, seed + 1)
    np.savez_compressed(os.path.join(out_dir, "reference.npz"), layer=np.int64(layer), **ref)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(f"{name}: {cls_name}, MoE layer {layer}, {size / 1024:.0f} KiB")


def main() -> None:
    ensure_venv()
    import torch
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "testdata", "hf"))
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    known = sorted(set(specs()) | set(CUSTOM))
    names = args.only or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"--only: unknown {unknown}; known: {known}")
    torch.set_num_threads(1)  # Reproducible float sums.
    for name in known:
        if name in names:
            # The seed depends on the name only, so that adding a checkpoint changes no other.
            make(name, args.out, seed=zlib.crc32(name.encode()) % 2**31)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
