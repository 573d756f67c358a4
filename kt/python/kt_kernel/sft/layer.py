"""``KTMoELayerWrapper``: the module that takes the place of a transformers MoE block's ``experts``.

In transformers 5 every MoE block routes in PyTorch and then calls
``self.experts(hidden_states, top_k_index, top_k_weights)``; this module answers that call with kt's
routed experts (``KTMoEFunction``). The router, the shared experts and everything else of the block stay
PyTorch modules, trained or frozen as the caller decides.

LoRA on the experts (unless the backend is a ``_SkipLoRA`` one) is six ``nn.Parameter``s of this module,
bf16 on the CPU, in kt's layout (PEFT orientation, one slice per expert): ``gate_lora_a`` / ``up_lora_a``
[E, r, H], ``gate_lora_b`` / ``up_lora_b`` [E, I, r], ``down_lora_a`` [E, r, I], ``down_lora_b`` [E, H, r].
kt reads them in place at every call, so an optimizer updating them in place is seen by the next forward.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .autograd import KTMoEFunction, forward_phase

LORA_NAMES = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")


class KTMoELayerWrapper(nn.Module):
    """Routed experts of one MoE layer in kt. ``forward(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]``, the call signature of transformers 5's experts modules.

    Built by ``wrap_moe_layers_with_kt_wrapper``; ``backend`` is the layer's ``AMXSFTMoEWrapper`` with its
    base weights loaded.
    """

    def __init__(
        self,
        backend,
        layer_idx: int,
        num_experts: int,
        hidden_size: int,
        moe_intermediate_size: int,
        top_k: int,
        lora_rank: int,
        retain_cpu_activations: bool = False,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        self.backend = backend
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.moe_intermediate_size = moe_intermediate_size
        self.top_k = top_k
        self.lora_rank = lora_rank
        self.retain_cpu_activations = bool(retain_cpu_activations)
        # Multiplies the LoRA gradients kt writes (1 / world_size when ranks average gradients).
        self.grad_scale = 1.0
        self._retained = []  # outputs of first forwards kept for the recompute pass (policy "retain")
        self._grad_buffers: Tuple[torch.Tensor, ...] = ()
        self.has_lora = not getattr(backend, "skip_lora", False)
        if self.has_lora:
            for name, shape in zip(LORA_NAMES, self.lora_shapes()):
                self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16)))
            self.reset_lora_parameters(generator)
            self._grad_buffers = tuple(torch.zeros(s, dtype=torch.bfloat16) for s in self.lora_shapes())
            backend.init_lora_weights(*self.lora_parameters(), *self._grad_buffers)

    def lora_shapes(self):
        E, H, I, r = self.num_experts, self.hidden_size, self.moe_intermediate_size, self.lora_rank
        return ((E, r, H), (E, I, r), (E, r, H), (E, I, r), (E, r, I), (E, H, r))

    def lora_parameters(self) -> Tuple[nn.Parameter, ...]:
        """The six LoRA parameters in kt's order (gate A, gate B, up A, up B, down A, down B); () for
        SkipLoRA."""
        return tuple(getattr(self, n) for n in LORA_NAMES) if self.has_lora else ()

    def lora_grad_buffers(self) -> Tuple[torch.Tensor, ...]:
        """kt's gradient buffers of the six LoRA parameters (overwritten by every backward)."""
        return self._grad_buffers

    @torch.no_grad()
    def reset_lora_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """PEFT's default LoRA init per expert: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with
        a = sqrt(5)), B = 0, so the adapter starts as the identity."""
        for name in LORA_NAMES:
            p = getattr(self, name)
            if name.endswith("_a"):
                bound = 1.0 / math.sqrt(p.shape[-1])
                p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator))
            else:
                p.zero_()

    @torch.no_grad()
    def load_lora_state(self, tensors) -> None:
        """Copies LoRA tensors (a mapping name -> tensor of ``lora_shapes``) into the parameters, in place (kt
        keeps reading the same storage)."""
        for name, shape in zip(LORA_NAMES, self.lora_shapes()):
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"layer {self.layer_idx} {name}: expected shape {list(shape)} (E, r, ... for rank "
                    f"{self.lora_rank}), got {list(t.shape)}"
                )
            getattr(self, name).copy_(t.to(torch.bfloat16))

    def _kt_inputs(self, hidden_states, top_k_index, top_k_weights):
        """The tensors kt takes: bf16 CPU hidden states, int64 ids, float32 weights, all contiguous."""
        x = hidden_states.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        ids = top_k_index.detach().to(device="cpu", dtype=torch.int64).contiguous()
        w = top_k_weights.detach().to(device="cpu", dtype=torch.float32).contiguous()
        return x, ids, w

    def _check_lora_storage(self) -> None:
        # kt holds pointers into the parameters' storage; replacing a parameter's .data (some wrappers do)
        # is followed by re-registering.
        if self.has_lora and tuple(p.data_ptr() for p in self.lora_parameters()) != self.backend._lora_ptrs[:6]:
            for p, name in zip(self.lora_parameters(), LORA_NAMES):
                if p.dtype != torch.bfloat16 or p.device.type != "cpu" or not p.is_contiguous():
                    raise ValueError(
                        f"layer {self.layer_idx} {name}: kt reads LoRA parameters as contiguous bf16 CPU tensors, "
                        f"got {p.dtype} on {p.device}"
                    )
            self.backend.init_lora_weights(*self.lora_parameters(), *self._grad_buffers)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if hidden_states.dim() != 2 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"layer {self.layer_idx}: hidden_states must be [tokens, {self.hidden_size}], got "
                f"{list(hidden_states.shape)}"
            )
        if hidden_states.shape[0] > self.backend.chunked_prefill_size:
            raise ValueError(
                f"layer {self.layer_idx}: {hidden_states.shape[0]} tokens in one MoE call, more than "
                f"kt_model_max_length={self.backend.chunked_prefill_size}; set kt_model_max_length to at least "
                "batch size x sequence length"
            )
        self._check_lora_storage()
        lora = self.lora_parameters()
        phase = forward_phase(hidden_states, top_k_weights, *lora)
        return KTMoEFunction.apply(hidden_states, top_k_index, top_k_weights, self, phase, *lora)

    def _apply(self, fn, recurse=True):
        # The experts live in kt on the CPU: model.to("cuda") / .to(dtype) / .half() must not move or convert
        # the LoRA parameters kt reads in place.
        return self

    def extra_repr(self) -> str:
        return (
            f"layer_idx={self.layer_idx}, num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"moe_intermediate_size={self.moe_intermediate_size}, top_k={self.top_k}, "
            f"lora_rank={self.lora_rank if self.has_lora else 0}, method={self.backend.method}"
        )
