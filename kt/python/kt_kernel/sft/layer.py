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
        # PEFT's per-expert adapters viewed into kt's LoRA tensors (kt_adapt_peft_lora): per LORA_NAMES entry,
        # the E parameters expert by expert; None while the LoRA is this module's own parameters.
        self._peft_views: Optional[Tuple[Tuple[nn.Parameter, ...], ...]] = None
        self._kt_lora: Tuple[torch.Tensor, ...] = ()  # kt's six tensors once PEFT's views replace the parameters
        if self.has_lora:
            for name, shape in zip(LORA_NAMES, self.lora_shapes()):
                self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16)))
            self.reset_lora_parameters(generator)
            self._grad_buffers = tuple(torch.zeros(s, dtype=torch.bfloat16) for s in self.lora_shapes())
            backend.init_lora_weights(*self.lora_parameters(), *self._grad_buffers)

    def lora_shapes(self):
        E, H, I, r = self.num_experts, self.hidden_size, self.moe_intermediate_size, self.lora_rank
        return ((E, r, H), (E, I, r), (E, r, H), (E, I, r), (E, r, I), (E, H, r))

    def lora_parameters(self) -> Tuple[torch.Tensor, ...]:
        """The six LoRA tensors kt reads, in kt's order (gate A, gate B, up A, up B, down A, down B); () for
        SkipLoRA. This module's parameters, or (after ``adapt_peft_lora``) plain tensors whose expert slices
        are PEFT's parameters."""
        if not self.has_lora:
            return ()
        return self._kt_lora if self._peft_views is not None else tuple(getattr(self, n) for n in LORA_NAMES)

    @property
    def peft_adapted(self) -> bool:
        """Whether the LoRA is PEFT's per-expert adapters viewed into kt's tensors (``adapt_peft_lora``)."""
        return self._peft_views is not None

    def trainable_lora_parameters(self) -> Tuple[nn.Parameter, ...]:
        """The parameters an optimizer updates: the six LoRA parameters, or PEFT's 6 x E per-expert ones."""
        if self._peft_views is not None:
            return tuple(p for per_expert in self._peft_views for p in per_expert)
        return self.lora_parameters()

    @torch.no_grad()
    def adapt_peft_lora(self, views) -> None:
        """Makes PEFT's per-expert LoRA parameters views into kt's LoRA tensors.

        ``views``: per ``LORA_NAMES`` entry, the E parameters of that matrix, expert by expert (PEFT's
        ``lora_A`` weight [r, in] for the ``_a`` names, ``lora_B`` [out, r] for the ``_b`` ones). Their current
        values become kt's (the adapter as PEFT initialised or loaded it); then each parameter's ``.data`` is
        its expert's slice of kt's contiguous bf16 tensor, so an optimizer's in-place update is what kt
        reads, and PEFT saves and loads them under its own names. This module's own six parameters go away.
        """
        if not self.has_lora:
            raise ValueError(f"layer {self.layer_idx}: a _SkipLoRA backend has no LoRA to adapt PEFT's to")
        shapes = self.lora_shapes()
        views = tuple(tuple(v) for v in views)
        if len(views) != 6:
            raise ValueError(f"layer {self.layer_idx}: expected 6 lists of per-expert parameters, got {len(views)}")
        for name, shape, per_expert in zip(LORA_NAMES, shapes, views):
            if len(per_expert) != self.num_experts:
                raise ValueError(
                    f"layer {self.layer_idx} {name}: {len(per_expert)} PEFT parameters for {self.num_experts} experts"
                )
            for e, p in enumerate(per_expert):
                if tuple(p.shape) != shape[1:]:
                    raise ValueError(
                        f"layer {self.layer_idx} expert {e} {name}: PEFT's tensor is {list(p.shape)}, kt's is "
                        f"{list(shape[1:])} (lora_rank {self.lora_rank}: set kt_lora_rank to PEFT's r)"
                    )
        tensors = self._kt_lora or self.lora_parameters()
        kt = tuple(t.detach() for t in tensors)
        for buf, per_expert in zip(kt, views):
            for e, p in enumerate(per_expert):
                if p.data_ptr() != buf[e].data_ptr():
                    buf[e].copy_(p.detach().to(device="cpu", dtype=torch.bfloat16))
                    p.data = buf[e]
        if self._peft_views is None:
            for name in LORA_NAMES:
                del self._parameters[name]
        self._kt_lora = kt
        self._peft_views = views
        self.backend.init_lora_weights(*self._kt_lora, *self._grad_buffers)

    def _follow_peft_views(self) -> None:
        """A PEFT parameter whose ``.data`` was replaced (moved, cast, reassigned) is copied into kt's tensor
        and made a view of it again."""
        for buf, per_expert in zip(self._kt_lora, self._peft_views):
            for e, p in enumerate(per_expert):
                if p.data_ptr() != buf[e].data_ptr():
                    with torch.no_grad():
                        buf[e].copy_(p.detach().to(device="cpu", dtype=torch.bfloat16))
                    p.data = buf[e]

    def _autograd_lora_grads(self) -> Tuple[torch.Tensor, ...]:
        """Copies of kt's LoRA gradients, shaped as ``trainable_lora_parameters``."""
        if self._peft_views is not None:
            return tuple(g[e].clone() for g in self._grad_buffers for e in range(self.num_experts))
        return tuple(g.clone() for g in self._grad_buffers)

    def lora_grad_buffers(self) -> Tuple[torch.Tensor, ...]:
        """kt's gradient buffers of the six LoRA parameters (overwritten by every backward)."""
        return self._grad_buffers

    @torch.no_grad()
    def reset_lora_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """PEFT's default LoRA init per expert: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with
        a = sqrt(5)), B = 0, so the adapter starts as the identity."""
        for name, p in zip(LORA_NAMES, self.lora_parameters()):
            if name.endswith("_a"):
                bound = 1.0 / math.sqrt(p.shape[-1])
                p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator))
            else:
                p.zero_()

    @torch.no_grad()
    def load_lora_state(self, tensors) -> None:
        """Copies LoRA tensors (a mapping name -> tensor of ``lora_shapes``) into the parameters, in place (kt
        keeps reading the same storage)."""
        for name, shape, dst in zip(LORA_NAMES, self.lora_shapes(), self.lora_parameters()):
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"layer {self.layer_idx} {name}: expected shape {list(shape)} (E, r, ... for rank "
                    f"{self.lora_rank}), got {list(t.shape)}"
                )
            dst.copy_(t.to(torch.bfloat16))

    def _kt_inputs(self, hidden_states, top_k_index, top_k_weights):
        """The tensors kt takes: bf16 CPU hidden states, int64 ids, float32 weights, all contiguous."""
        x = hidden_states.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        ids = top_k_index.detach().to(device="cpu", dtype=torch.int64).contiguous()
        w = top_k_weights.detach().to(device="cpu", dtype=torch.float32).contiguous()
        return x, ids, w

    def _check_lora_storage(self) -> None:
        # kt holds pointers into the parameters' storage; replacing a parameter's .data (some wrappers do)
        # is followed by re-registering.
        if self._peft_views is not None:
            self._follow_peft_views()
            return
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
        lora = self.trainable_lora_parameters()
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
