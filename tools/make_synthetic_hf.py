#!/usr/bin/env python3
"""Writes a synthetic Hugging Face MoE checkpoint folder (config.json, one safetensors shard per layer,
model.safetensors.index.json) with random bf16 routed experts, for measuring `kt convert` and
load_weights(weight_path) on real sizes without downloading a model.

    tools/make_synthetic_hf.py --out /tmp/synth30b --shape qwen3-30b-a3b --layers 4     # 4.8 GB
    tools/make_synthetic_hf.py --out /tmp/synth235b --shape qwen3-235b-a22b --layers 1  # 4.8 GB

Only the routed experts are written (what kt reads). Weights are random bf16 in (-2, 2) (bit 14 cleared,
so never Inf/NaN); one layer's bytes are generated once and reused for every layer (the files differ in
tensor names only), which keeps generation at disk speed. Standard library + numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import struct

import numpy as np

SHAPES = {  # E, k, H, I
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "qwen3-235b-a22b": (128, 8, 4096, 1536),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    E, k, H, I = SHAPES[a.shape]
    os.makedirs(a.out, exist_ok=True)
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": H,
        "num_hidden_layers": a.layers, "num_experts": E, "num_experts_per_tok": k,
        "moe_intermediate_size": I, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    rng = np.random.default_rng(a.seed)
    mat = I * H  # elements of one expert matrix (gate, up and down have the same count)
    blob = (rng.integers(0, 1 << 16, size=E * 3 * mat, dtype=np.uint16) & np.uint16(0xBFFF)).tobytes()
    weight_map = {}
    for layer in range(a.layers):
        shard = f"model-{layer + 1:05d}-of-{a.layers:05d}.safetensors"
        header = {}
        offset = 0
        for e in range(E):
            for name, shape in (("gate_proj", [I, H]), ("up_proj", [I, H]), ("down_proj", [H, I])):
                t = f"model.layers.{layer}.mlp.experts.{e}.{name}.weight"
                header[t] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + 2 * mat]}
                weight_map[t] = shard
                offset += 2 * mat
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        path = os.path.join(a.out, shard)
        with open(path + ".tmp", "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            f.write(blob)  # tensors in header order: expert-major, gate/up/down
        os.replace(path + ".tmp", path)
        print(f"wrote {path} ({(8 + len(text) + len(blob)) / 1e9:.2f} GB)", flush=True)
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": a.layers * len(blob)}, "weight_map": weight_map}, f)


if __name__ == "__main__":
    main()
