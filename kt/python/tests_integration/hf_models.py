"""Tiny random transformers MoE models built from configs, and a plain-PyTorch LoRA experts module: the
independent reference the kt integration is compared with."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import transformers
from torch import nn

VOCAB = 64

# The repository's checkpoints made by transformers (testdata/README.md).
TESTDATA_HF = os.environ.get("KT_TESTDATA") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "testdata", "hf")

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def tiny_config(arch: str):
    """A config of ``arch`` with two (or three) decoder layers, 8 routed experts of size 32, top-2."""
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **_COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        )
    if arch == "mixtral":
        return transformers.MixtralConfig(
            **_COMMON, intermediate_size=32, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
        )
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **{k: v for k, v in _COMMON.items() if k != "head_dim"}, intermediate_size=96,
            moe_intermediate_size=32, shared_expert_intermediate_size=48, num_hidden_layers=2, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        )
    if arch == "deepseek_v3":
        # Layer 0 dense, layers 1-2 MoE with grouped noaux_tc routing (4 groups, 2 chosen), a shared expert
        # and routed_scaling_factor.
        return transformers.DeepseekV3Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16, q_lora_rank=32,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=128,
            tie_word_embeddings=False,
        )
    raise ValueError(f"no tiny config for {arch!r}")


def tiny_model(arch: str, seed: int = 0) -> nn.Module:
    """A bf16 CPU causal LM of ``tiny_config(arch)`` with random weights (seeded), eager attention.
    ``qwen3_5_moe`` is testdata/hf/qwen3_5_moe instead: Qwen3.5-MoE's multimodal class, its decoder under
    ``model.language_model`` and its sizes in ``config.text_config`` (H 64, I 48, 8 experts, top-2)."""
    if arch == "qwen3_5_moe":
        model = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(
            os.path.join(TESTDATA_HF, "qwen3_5_moe"), dtype=torch.bfloat16, attn_implementation="eager"
        )
        assert model.config.text_config.vocab_size == VOCAB
        return model
    config = tiny_config(arch)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Larger than the default init (std 0.02) so that the experts matter to the loss; DeepSeek's
            # correction bias gets random values so that grouped routing depends on it.
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn_like(p) * 0.1)
            elif p.dim() >= 2:
                p.copy_(torch.randn_like(p) * 0.08)
    return model.to(torch.bfloat16)


class _RoundForward(torch.autograd.Function):
    """x rounded to bf16 (kept in x's dtype); the gradient passes unchanged."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.bfloat16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _RoundBackward(torch.autograd.Function):
    """x unchanged; the gradient arriving at x rounded to bf16 before it flows further."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(torch.bfloat16).to(grad.dtype)


class RefLoRAExperts(nn.Module):
    """Plain PyTorch routed experts with LoRA, called as transformers 5 calls its experts module.

    Per routed (token, expert): g = W_g x + s B_g A_g x, u = W_u x + s B_u A_u x, h = silu(g) u,
    y = W_d h + s B_d A_d h; out = sum of routing weight * y. Computed in float32 from the bf16 weights,
    output rounded to the input dtype. LoRA parameters are bf16 [E, r, in] / [E, out, r], as kt's.

    ``kt_roundings``: also round where kt's SFT engine documents it rounds to bf16 (kt/sft/README.md,
    "Roundings"): h before the down product, and the gradients dy, dg, du before the products that read
    them. Everything else stays fp32, so the two then differ by accumulation order only: a reference for
    comparisons whose subject is not the experts' arithmetic (the GPU host's device split,
    tools/amx_host/sft_gpu_parity.py), where the default fp32 one leaves kt's bf16 roundings amplified
    by training chaos on top. ``compute_dtype`` float64: the same reference more exactly, to measure how far
    two correct implementations drift apart over a training run (sft_gpu_parity.py --floor).
    """

    NAMES = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")

    def __init__(self, experts: nn.Module, lora: dict, scaling: float, kt_roundings: bool = False,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.kt_roundings = kt_roundings
        self.compute_dtype = compute_dtype
        I = experts.down_proj.shape[-1]
        gu = experts.gate_up_proj.detach()
        self.register_buffer("w_gate", gu[:, :I].clone())
        self.register_buffer("w_up", gu[:, I:].clone())
        self.register_buffer("w_down", experts.down_proj.detach().clone())
        for name in self.NAMES:
            self.register_parameter(name, nn.Parameter(lora[name].detach().clone().to(torch.bfloat16)))
        self.scaling = scaling

    def forward(self, hidden_states, top_k_index, top_k_weights):
        s = self.scaling
        cd = self.compute_dtype
        x = hidden_states.to(cd)
        out = torch.zeros_like(x)
        for e in torch.unique(top_k_index).tolist():
            tok, slot = torch.where(top_k_index == e)
            xe = x[tok]

            def proj(inp, w, a, b):
                return inp @ w[e].to(cd).T + s * (inp @ a[e].to(cd).T) @ b[e].to(cd).T

            g = proj(xe, self.w_gate, self.gate_lora_a, self.gate_lora_b)
            u = proj(xe, self.w_up, self.up_lora_a, self.up_lora_b)
            if self.kt_roundings:
                g, u = _RoundBackward.apply(g), _RoundBackward.apply(u)
            h = F.silu(g) * u
            if self.kt_roundings:
                h = _RoundForward.apply(h)
            y = proj(h, self.w_down, self.down_lora_a, self.down_lora_b)
            if self.kt_roundings:
                y = _RoundBackward.apply(y)
            out = out.index_add(0, tok, y * top_k_weights[tok, slot, None].to(cd))
        return out.to(hidden_states.dtype)


def moe_blocks(model: nn.Module):
    """(layer index, MoE block) of every decoder layer whose mlp has experts."""
    found = []
    for name, module in model.named_modules():
        if name.endswith(".mlp") and hasattr(module, "experts"):
            found.append((int(name.split("layers.")[1].split(".")[0]), module))
    return found
