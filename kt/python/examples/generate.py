#!/usr/bin/env python3
"""Greedy generation with a Hugging Face MoE model whose routed experts run in kt.

    python kt/python/examples/generate.py --model testdata/hf/qwen3_moe --check
    python kt/python/examples/generate.py --model testdata/hf/deepseek_v3 --num-gpu-experts 3 --check
    python kt/python/examples/generate.py --model /models/Qwen3-30B-A3B --prompt "Hello" --device cuda \\
        --dtype bfloat16 --num-gpu-experts 16 --method AMXINT8

transformers loads the folder; each MoE block's routed ``experts`` module is replaced by ``KTExperts``, which
hands the block's own routing (its top-k ids and weights, any routed scaling factor already folded in) to a
``kt_kernel.KTMoEWrapper`` that reads the experts from the same folder itself (``weight_path``). Routers,
shared experts, attention and the dense layers stay transformers' code.

Hybrid split (``--gpu-experts-mask`` / ``--num-gpu-experts``): the masked experts are computed by torch from
the model's own weights on the model's device, kt computes the others (it skips masked ids itself), the two
are added. With ``--device cuda`` this is SGLang's sequence: kt's work is ordered on a side CUDA stream
(``submit_forward(x, ids_int32, weights, stream)`` ... ``sync_forward(x, stream)``) while the GPU experts
run on the main stream. With ``--device cpu`` the same split runs with CPU tensors (kt's task queue works
while torch computes the masked experts), which is what CI exercises.

``--check`` first generates with plain transformers (same model, same dtype, its own experts) and exits
with status 1 if the tokens differ. kt's experts use bf16 weights (exactly the checkpoint's), bf16 inputs
and fp32 accumulation and return bf16; run the model in float32 (the default) so that these roundings are
the only difference from the reference. Where the reference's top-1/top-2 logit margin is tiny, a
different token there is a tie broken differently, not a wrong result: the report prints the margins.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kt_kernel import KTMoEWrapper
from kt_kernel.sft.arch import find_experts, get_moe_arch, is_fused_experts, num_routed_experts


class KTExperts(nn.Module):
    """Drop-in for a transformers 5 experts module: ``forward(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]`` with the CPU experts in kt and the masked ones in torch."""

    def __init__(self, kt, gpu_ids: torch.Tensor, gate_up: Optional[torch.Tensor], down: Optional[torch.Tensor],
                 side_stream=None):
        super().__init__()
        self.kt = kt
        self.side_stream = side_stream
        # The masked experts' weights on the model's device, in the model's dtype (gate rows first in gate_up).
        # Buffers, so that model.to(device) moves them with the model.
        self.register_buffer("gpu_ids", gpu_ids, persistent=False)
        self.register_buffer("gate_up", gate_up, persistent=False)
        self.register_buffer("down", down, persistent=False)

    def _torch_experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The masked experts' weighted sum, dense over the batch (no data-dependent shapes, so no host sync)."""
        out = torch.zeros_like(x)
        for j in range(self.gpu_ids.numel()):
            w = (weights * (ids == self.gpu_ids[j])).sum(dim=-1, keepdim=True).to(x.dtype)  # [T, 1]
            gate, up = F.linear(x, self.gate_up[j]).chunk(2, dim=-1)
            out += F.linear(F.silu(gate) * up, self.down[j]) * w
        return out

    def forward(self, hidden_states, top_k_index, top_k_weights):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        ids = top_k_index.reshape(x.shape[0], -1)
        weights = top_k_weights.reshape(x.shape[0], -1)
        x_bf16 = x.to(torch.bfloat16).contiguous()
        w_f32 = weights.to(torch.float32).contiguous()
        if x.is_cuda:
            main, side = torch.cuda.current_stream(x.device), self.side_stream
            ids_i32 = ids.to(torch.int32).contiguous()  # what SGLang passes
            side.wait_stream(main)  # x, ids, weights are made on the main stream
            with torch.cuda.stream(side):
                self.kt.submit_forward(x_bf16, ids_i32, w_f32, side.cuda_stream)
            gpu_out = self._torch_experts(x, ids, weights) if self.gate_up is not None else None
            with torch.cuda.stream(side):
                cpu_out = self.kt.sync_forward(x_bf16, side.cuda_stream)
            main.wait_stream(side)
            # The staging tensors were made on main and read on side: keep them until main passes this point.
            for t in (x_bf16, ids_i32, w_f32):
                t.record_stream(side)
        else:
            self.kt.submit_forward(x_bf16, ids.contiguous(), w_f32, None)
            gpu_out = self._torch_experts(x, ids, weights) if self.gate_up is not None else None
            cpu_out = self.kt.sync_forward(x_bf16, None)
        # On CUDA cpu_out is kt's persistent buffer, reused by a later layer: never hand it out itself.
        out = cpu_out.to(x.dtype, copy=x.is_cuda)
        if gpu_out is not None:
            out = out + gpu_out
        return out.reshape(shape)


def parse_mask(text: Optional[str], num_gpu: Optional[int], num_experts: int) -> torch.Tensor:
    """bool [E]: --gpu-experts-mask "0,3,5" (expert ids) or --num-gpu-experts N (experts [0, N))."""
    mask = torch.zeros(num_experts, dtype=torch.bool)
    if text:
        for part in text.split(","):
            e = int(part)
            if not 0 <= e < num_experts:
                raise SystemExit(f"--gpu-experts-mask: expert {e} is not in [0, {num_experts})")
            mask[e] = True
    elif num_gpu:
        if not 0 <= num_gpu <= num_experts:
            raise SystemExit(f"--num-gpu-experts {num_gpu} is not in [0, {num_experts}]")
        mask[:num_gpu] = True
    return mask


def wrap_model(model: nn.Module, folder: str, method: str = "BF16", gpu_mask: Optional[torch.Tensor] = None,
               threads: Optional[int] = None, chunked_prefill_size: int = 4096,
               device: Optional[str] = None) -> List[KTExperts]:
    """Replaces every MoE block's routed experts of ``model`` by ``KTExperts`` (kt loads the experts from
    ``folder``); the torch weights of experts that are not in ``gpu_mask`` are dropped, those in it are kept
    on ``device`` (default: the model's), where the model must then be moved. Returns the wrappers."""
    arch, tc = get_moe_arch(model)  # the model types kt_kernel.sft knows, and their MoE blocks
    top_k = tc.num_experts_per_tok
    device = torch.device(device) if device is not None else next(model.parameters()).device
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    threads = threads or os.cpu_count() or 1
    out = []
    for layer_idx, block, attr, experts in list(find_experts(model, arch)):
        if not is_fused_experts(experts):
            raise SystemExit(f"layer {layer_idx}: {type(experts).__name__} is not transformers 5's fused experts")
        E, two_i, H = experts.gate_up_proj.shape
        if num_routed_experts(tc) not in (None, E):
            raise SystemExit(f"layer {layer_idx}: {E} experts in the model, {num_routed_experts(tc)} in the config")
        mask = torch.zeros(E, dtype=torch.bool) if gpu_mask is None else gpu_mask.clone()
        if device.type == "cuda":
            mask = mask.pin_memory()
        kt = KTMoEWrapper(
            layer_idx=layer_idx, num_experts=E, num_experts_per_tok=top_k, hidden_size=H,
            moe_intermediate_size=two_i // 2, gpu_experts_mask=mask, cpuinfer_threads=threads,
            threadpool_count=1, weight_path=folder, chunked_prefill_size=chunked_prefill_size, method=method,
            max_deferred_experts_per_token=0,
        )
        kt.load_weights()
        gpu_ids = mask.nonzero().flatten()
        gate_up = down = None
        if gpu_ids.numel():
            sel = gpu_ids.to(experts.gate_up_proj.device)
            gate_up = experts.gate_up_proj.detach()[sel].to(device)
            down = experts.down_proj.detach()[sel].to(device)
        wrapper = KTExperts(kt, gpu_ids.to(device), gate_up, down, side)
        setattr(block, attr, wrapper)  # the block still routes; its experts call now lands here
        out.append(wrapper)
    if not out:
        raise SystemExit(f"{type(model).__name__}: no MoE block found")
    return out


@torch.no_grad()
def greedy(model: nn.Module, prompt: Sequence[int], max_new_tokens: int) -> Tuple[List[int], List[float], float]:
    """(new tokens, top-1 minus top-2 logit at each step, decode seconds) of greedy decoding with a KV cache."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    tokens, margins = [], []
    out = model(input_ids=ids, use_cache=True)
    t0 = None
    for step in range(max_new_tokens):
        top2 = out.logits[0, -1].float().topk(2)
        tok = int(top2.indices[0])
        tokens.append(tok)
        margins.append(float(top2.values[0] - top2.values[1]))
        if step == 0:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()  # decode time: after the prefill's first token
        if step + 1 == max_new_tokens:
            break
        nxt = torch.tensor([[tok]], dtype=torch.long, device=device)
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return tokens, margins, time.perf_counter() - t0


def load_model(folder: str, dtype: torch.dtype, device: str) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    tc = getattr(config, "text_config", None) or config
    rope = getattr(tc, "qk_rope_head_dim", None)
    if rope is not None and getattr(tc, "head_dim", rope) != rope:
        # MLA models (DeepSeek, GLM-4.7-Flash, GLM-5): transformers 5.17 derives head_dim = qk_rope_head_dim
        # (the rotary size) but save_pretrained writes the q/k head size there, which breaks RoPE on reload.
        tc.head_dim = rope
    if rope is not None and getattr(tc, "kv_lora_rank", None) and tc.num_key_value_heads != tc.num_attention_heads:
        # MLA expands its compressed KV to every attention head, so the heads are not grouped; a config with
        # fewer key/value heads (testdata's tiny DeepSeek checkpoints) would make eager attention repeat them.
        tc.num_key_value_heads = tc.num_attention_heads
    auto = transformers.AutoModelForCausalLM
    if type(config) not in auto._model_mapping and hasattr(transformers, "AutoModelForImageTextToText"):
        auto = transformers.AutoModelForImageTextToText  # Qwen3.5-MoE, Qwen3-VL-MoE, GLM-4.xV: text only here
    model = auto.from_pretrained(folder, config=config, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


def run(folder: str, prompt: Sequence[int], max_new_tokens: int = 16, method: str = "BF16",
        dtype: torch.dtype = torch.float32, device: str = "cpu", gpu_mask: Optional[torch.Tensor] = None,
        threads: Optional[int] = None, check: bool = False, log=print) -> dict:
    """Loads ``folder``, (with ``check``) generates with plain transformers, wraps the experts in kt and
    generates again. Returns {"tokens", "margins", "seconds", and with check "ref_tokens", "ref_margins",
    "ref_seconds", "equal"}."""
    # Loaded on the CPU and moved to `device` once the routed experts are gone (unless the check needs them).
    model = load_model(folder, dtype, "cpu")
    result = {}
    if check:
        model.to(device)
        ref, ref_margins, ref_s = greedy(model, prompt, max_new_tokens)
        result.update(ref_tokens=ref, ref_margins=ref_margins, ref_seconds=ref_s)
    wrap_model(model, folder, method, gpu_mask, threads, chunked_prefill_size=max(len(prompt), 64), device=device)
    model.to(device)
    tokens, margins, secs = greedy(model, prompt, max_new_tokens)
    result.update(tokens=tokens, margins=margins, seconds=secs)
    if check:
        result["equal"] = tokens == result["ref_tokens"]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face MoE folder (config.json + safetensors)")
    p.add_argument("--method", default="BF16", help="kt inference method (BF16, AMXINT8, AMXINT4, MOE_INT8, ...)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt-ids", type=int, nargs="+", help="prompt token ids (default: 3 14 15 9 26 5 35)")
    g.add_argument("--prompt", help="prompt text (needs the folder's tokenizer)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where attention, dense layers and masked experts run; kt always runs on the CPU")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the model's dtype (float32: kt's bf16 experts are the only difference in --check)")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--num-gpu-experts", type=int, default=0, help="experts [0, N) of every layer in torch")
    m.add_argument("--gpu-experts-mask", help="comma-separated expert ids computed in torch in every layer")
    p.add_argument("--threads", type=int, default=None, help="kt worker threads (default: all CPUs)")
    p.add_argument("--check", action="store_true", help="compare with plain transformers; exit 1 if different")
    args = p.parse_args(argv)

    import transformers

    tokenizer = None
    if args.prompt is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        prompt = tokenizer(args.prompt)["input_ids"]
    else:
        prompt = args.prompt_ids or [3, 14, 15, 9, 26, 5, 35]
    config = transformers.AutoConfig.from_pretrained(args.model)
    tc = getattr(config, "text_config", None) or config
    num_experts = num_routed_experts(tc)
    if num_experts is None:
        raise SystemExit(f"{args.model}: config.json names no routed expert count")
    mask = parse_mask(args.gpu_experts_mask, args.num_gpu_experts, num_experts)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    r = run(args.model, prompt, args.max_new_tokens, args.method, getattr(torch, args.dtype), args.device,
            mask if mask.any() else None, args.threads, args.check)

    where = f"{args.device}, torch experts {mask.nonzero().flatten().tolist()}" if mask.any() else args.device
    n = len(r["tokens"])
    print(f"prompt   {list(prompt)}")
    print(f"kt       {r['tokens']}  ({where}, method {args.method}, {args.dtype}; "
          f"decode {max(n - 1, 0) / r['seconds']:.1f} tokens/s)")
    if tokenizer is not None:
        print(f"text     {tokenizer.decode(r['tokens'])!r}")
    if not args.check:
        return 0
    print(f"ref      {r['ref_tokens']}  (plain transformers; decode "
          f"{max(n - 1, 0) / r['ref_seconds']:.1f} tokens/s)")
    print(f"margins  reference top-1 minus top-2 logit, smallest {min(r['ref_margins']):.4f} "
          f"(step {r['ref_margins'].index(min(r['ref_margins']))})")
    if r["equal"]:
        print(f"check    OK: {n} tokens equal")
        return 0
    first = next(i for i, (a, b) in enumerate(zip(r["tokens"], r["ref_tokens"])) if a != b)
    print(f"check    FAILED: tokens differ from step {first} (reference margin there "
          f"{r['ref_margins'][first]:.4f})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
