"""Which transformers models kt can wrap, and how their routed experts are found and read.

The table is keyed by the text config's ``model_type`` (``config.text_config`` for multimodal models such as
Qwen3.5-MoE and Qwen3-VL-MoE). Routing is not part of it: transformers 5 routes in the MoE block (softmax
top-k, DeepSeek's grouped ``noaux_tc`` with its correction bias and ``routed_scaling_factor``, ...) and then
calls ``experts(hidden_states, top_k_index, top_k_weights)``, so kt takes over at that call and every router
stays transformers' own code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Tuple

import torch
from torch import nn


@dataclass(frozen=True)
class MoEArch:
    """model_type: the text config's; block_attr: the decoder layer's attribute holding the MoE block."""

    model_type: str
    block_attr: str = "mlp"


# Every one of these routes in its MoE block and calls experts(hidden_states, top_k_index, top_k_weights)
# with fused gate_up_proj / down_proj experts (transformers 5.17).
_ARCHS = {
    t: MoEArch(t)
    for t in (
        "qwen2_moe",
        "qwen3_moe",
        "qwen3_next",
        "qwen3_vl_moe_text",
        "qwen3_5_moe_text",
        "mixtral",
        "minimax",
        "minimax_m2",
        "deepseek_v2",
        "deepseek_v3",
        "deepseek_v32",
        "glm4_moe",
        "glm4_moe_lite",
        "glm4v_moe_text",
        "glm_moe_dsa",
    )
}

SUPPORTED_MODEL_TYPES = tuple(sorted(_ARCHS))


def num_routed_experts(tc):
    """The routed expert count of a text config (its name differs by family), or None."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        value = getattr(tc, key, None)
        if isinstance(value, int):
            return value
    return None


def text_config(config):
    """The config holding the decoder's sizes: ``config.text_config`` when there is one, else ``config``."""
    inner = getattr(config, "text_config", None)
    return inner if inner is not None else config


def get_moe_arch(model: nn.Module) -> Tuple[MoEArch, object]:
    """(arch entry, text config) of ``model``; ValueError naming the model class and the supported types."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config; expected a transformers PreTrainedModel")
    tc = text_config(config)
    arch = _ARCHS.get(getattr(tc, "model_type", None))
    if arch is None:
        raise ValueError(
            f"{type(model).__name__} (model_type={getattr(tc, 'model_type', None)!r}) is not an MoE architecture "
            f"kt can wrap; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = getattr(tc, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(
            f"{type(model).__name__}: kt's experts compute SiLU(gate) * up, the config has hidden_act={act!r}"
        )
    return arch, tc


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def find_experts(model: nn.Module, arch: MoEArch) -> Iterator[Tuple[int, nn.Module, str, nn.Module]]:
    """(layer index, MoE block, attribute name, experts module) for every MoE block of ``model``: a decoder
    layer's ``arch.block_attr`` module that has ``experts``."""
    for name, module in model.named_modules():
        if not name.endswith("." + arch.block_attr) and name != arch.block_attr:
            continue
        experts = getattr(module, "experts", None)
        if experts is None:
            continue
        m = _LAYER_RE.search(name + ".")
        if m is None:
            raise ValueError(f"MoE block {name!r}: cannot read its layer index (expected '...layers.<n>.' in the name)")
        yield int(m.group(1)), module, "experts", experts


def is_fused_experts(experts: nn.Module) -> bool:
    """transformers 5's layout: ``gate_up_proj`` [E, 2I, H] (gate rows first) and ``down_proj`` [E, H, I]."""
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3


# Per-expert module names of transformers 4 style ModuleLists: (gate, up, down).
_PER_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))

# Model types whose transformers 4 MoE blocks (a per-expert ModuleList) kt routes itself: router
# ``gate`` (Linear [E, H]), softmax in float32, top-k, renormalised when ``norm_topk_prob`` (Mixtral: always),
# cast to the hidden states' dtype; Qwen2-MoE adds ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``.
# (transformers 4's Qwen2MoeSparseMoeBlock, Qwen3MoeSparseMoeBlock and MixtralSparseMoeBlock.)
PER_EXPERT_ROUTED_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


def per_expert_names(experts: nn.Module):
    """(gate, up, down) attribute names of a per-expert ModuleList's experts, or None when it is not one."""
    if not isinstance(experts, nn.ModuleList) or len(experts) == 0:
        return None
    for names in _PER_EXPERT_NAMES:
        if all(hasattr(e, n) for e in experts for n in names):
            return names
    return None


def route_softmax_topk(block: nn.Module, tc, x: torch.Tensor, top_k: int):
    """transformers 4's routing of ``PER_EXPERT_ROUTED_TYPES``: (router_logits, top-k ids, top-k weights
    in x's dtype)."""
    logits = block.gate(x)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    norm = getattr(tc, "norm_topk_prob", None)
    if norm is None:
        norm = getattr(tc, "model_type", None) == "mixtral"
    if norm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, ids, weights.to(x.dtype)


def extract_expert_weights(experts: nn.Module, where: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [E, I, H], up [E, I, H], down [E, H, I]): bf16, CPU, contiguous copies of the expert weights
    of a fused (transformers 5) experts module or a per-expert ModuleList (transformers 4)."""
    if is_fused_experts(experts):
        for flag, ok in (("is_transposed", False), ("is_concatenated", True), ("has_bias", False), ("has_gate", True)):
            if getattr(experts, flag, ok) != ok:
                raise ValueError(f"{where}: experts with {flag}={not ok} are not supported by kt")
        gu, down = experts.gate_up_proj, experts.down_proj
        _check_materialized(where, gu)
        E, two_i, H = gu.shape
        if two_i % 2 or tuple(down.shape) != (E, H, two_i // 2):
            raise ValueError(
                f"{where}: gate_up_proj {list(gu.shape)} and down_proj {list(down.shape)} do not form "
                "[E, 2I, H] and [E, H, I]"
            )
        I = two_i // 2
        gu = gu.detach().to(device="cpu", dtype=torch.bfloat16)
        return (
            gu[:, :I].contiguous(),
            gu[:, I:].contiguous(),
            down.detach().to(device="cpu", dtype=torch.bfloat16).contiguous(),
        )
    if isinstance(experts, nn.ModuleList) and len(experts) > 0:
        first = experts[0]
        for names in _PER_EXPERT_NAMES:
            if all(isinstance(getattr(first, n, None), nn.Linear) for n in names):
                mats = []
                for n in names:
                    ws = [getattr(e, n).weight for e in experts]
                    _check_materialized(where, ws[0])
                    if any(getattr(e, n).bias is not None for e in experts):
                        raise ValueError(f"{where}: experts with biases are not supported by kt")
                    mats.append(torch.stack([w.detach().to(device="cpu", dtype=torch.bfloat16) for w in ws]))
                return tuple(m.contiguous() for m in mats)
    raise ValueError(
        f"{where}: experts module {type(experts).__name__} is neither fused (gate_up_proj [E, 2I, H] and down_proj "
        "[E, H, I]) nor a ModuleList of experts with gate_proj/up_proj/down_proj or w1/w3/w2 Linear layers"
    )


def _check_materialized(where: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        raise ValueError(f"{where}: the expert weights are on the meta device; load the model's weights first")
