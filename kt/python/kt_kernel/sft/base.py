"""Base pieces of the SFT backends: the shared buffer cache and the wrapper base class."""

from __future__ import annotations

import threading
from typing import Dict, Tuple

import torch

from .. import _native
from .._args import SftArgs
from .._checks import (
    check_expert_map,
    check_expert_weights,
    check_int,
    check_moe_shape,
    check_routing,
    check_tensor,
)


class KExpertsSFTBuffer:
    """Process-wide SFT objects shared by layers: the C++ working memory (one ``SftWorkspace``, grow-only,
    used by one call at a time since every compute call is serialized), with ``share_backward_bb`` one
    transposed-weight copy per layer shape, and with ``share_cache_pool`` one activation-cache pool per
    layer shape, method and max_cache_depth."""

    _lock = threading.Lock()
    _cache: Dict[object, object] = {}

    @classmethod
    def get(cls, key, factory):
        """The cached object for ``key``, made by ``factory()`` on first use."""
        with cls._lock:
            obj = cls._cache.get(key)
            if obj is None:
                obj = factory()
                cls._cache[key] = obj
            return obj

    @classmethod
    def clear_cache(cls) -> None:
        """Drops every cached SFT buffer (layers already built keep theirs alive)."""
        with cls._lock:
            cls._cache.clear()


class BaseSFTMoEWrapper:
    """The SFT backend of one MoE layer: forward with an activation cache, backward with LoRA gradients.

    Subclasses build ``self._layer`` (a ``_kt.SftMoeLayer``). Shapes: E experts, k = num_experts_per_tok,
    H = hidden_size, I = moe_intermediate_size, r = lora_rank.
    """

    def __init__(self, a: SftArgs):
        self.args = a
        shape = check_moe_shape(
            a.layer_idx, a.num_experts, a.num_experts_per_tok, a.hidden_size, a.moe_intermediate_size
        )
        self.layer_idx, self.num_experts, self.num_experts_per_tok, self.hidden_size, self.moe_intermediate_size = shape
        self.num_gpu_experts = check_int("num_gpu_experts", a.num_gpu_experts, 0)
        if self.num_gpu_experts != 0:
            raise NotImplementedError(
                f"num_gpu_experts={self.num_gpu_experts}: SFT with experts on the GPU is not implemented yet in "
                "kt; all experts run on the CPU (num_gpu_experts=0)"
            )
        self.cpuinfer_threads = check_int("cpuinfer_threads", a.cpuinfer_threads, 1)
        self.threadpool_count = check_int("threadpool_count", a.threadpool_count, 1)
        self.weight_path = a.weight_path
        self.chunked_prefill_size = check_int("chunked_prefill_size", a.chunked_prefill_size, 1)
        self.lora_rank = check_int("lora_rank", a.lora_rank, 1)
        if isinstance(a.lora_alpha, bool) or not isinstance(a.lora_alpha, (int, float)):
            raise TypeError(f"lora_alpha must be a number, got {type(a.lora_alpha).__name__}")
        self.lora_alpha = float(a.lora_alpha)
        self.max_cache_depth = check_int("max_cache_depth", a.max_cache_depth, 1)
        self.method = a.method
        self._lora: Tuple[torch.Tensor, ...] = ()
        self._lora_ptrs: Tuple[int, ...] = ()
        _native.get_thread_pool(self.cpuinfer_threads)

    @property
    def lora_scaling(self) -> float:
        """s = lora_alpha / lora_rank, the factor of every LoRA product."""
        return self.lora_alpha / self.lora_rank

    def _pool(self):
        return _native.get_thread_pool(self.cpuinfer_threads)

    @property
    def cache_depth(self) -> int:
        """Forwards cached (save_for_backward=True) and not yet consumed by backward."""
        return self._layer.cache_depth

    # -- weights ------------------------------------------------------------------------------------------

    def load_weights_from_tensors(
        self,
        gate_proj: torch.Tensor,
        up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        physical_to_logical_map_cpu=None,
    ) -> None:
        """Loads the frozen base weights: bf16 CPU contiguous gate_proj and up_proj [E, I, H], down_proj
        [E, H, I]; physical_to_logical_map_cpu int64 [E] or None (identity). The tensors are copied (and
        quantized for INT8), so they may be freed afterwards."""
        check_expert_weights(
            gate_proj, up_proj, down_proj, self.num_experts, self.moe_intermediate_size, self.hidden_size
        )
        mapping = check_expert_map(physical_to_logical_map_cpu, self.num_experts)
        map_ptr = 0 if mapping is None else mapping.data_ptr()
        self._layer.load_weights(
            gate_proj.data_ptr(), up_proj.data_ptr(), down_proj.data_ptr(), map_ptr, self._pool()
        )
        self._weights_loaded = True

    _LORA_NAMES = (
        "gate_lora_a",
        "gate_lora_b",
        "up_lora_a",
        "up_lora_b",
        "down_lora_a",
        "down_lora_b",
    )

    def _lora_shapes(self):
        E, H, I, r = self.num_experts, self.hidden_size, self.moe_intermediate_size, self.lora_rank
        return (
            ((E, r, H), "[E, r, H]"),
            ((E, I, r), "[E, I, r]"),
            ((E, r, H), "[E, r, H]"),
            ((E, I, r), "[E, I, r]"),
            ((E, r, I), "[E, r, I]"),
            ((E, H, r), "[E, H, r]"),
        )

    def init_lora_weights(
        self,
        gate_lora_a: torch.Tensor,
        gate_lora_b: torch.Tensor,
        up_lora_a: torch.Tensor,
        up_lora_b: torch.Tensor,
        down_lora_a: torch.Tensor,
        down_lora_b: torch.Tensor,
        grad_gate_lora_a: torch.Tensor,
        grad_gate_lora_b: torch.Tensor,
        grad_up_lora_a: torch.Tensor,
        grad_up_lora_b: torch.Tensor,
        grad_down_lora_a: torch.Tensor,
        grad_down_lora_b: torch.Tensor,
    ) -> None:
        """Registers the caller's LoRA tensors (PEFT orientation: A = [E, r, in], B = [E, out, r]; gate/up
        in = H, out = I; down in = I, out = H) and their gradient tensors of the same shapes. All bf16, CPU,
        contiguous. They are used in place: an optimizer updating them is seen by the next forward, and
        backward writes the gradients into the grad tensors. Keep them alive (this wrapper holds a
        reference)."""
        tensors = (
            gate_lora_a,
            gate_lora_b,
            up_lora_a,
            up_lora_b,
            down_lora_a,
            down_lora_b,
            grad_gate_lora_a,
            grad_gate_lora_b,
            grad_up_lora_a,
            grad_up_lora_b,
            grad_down_lora_a,
            grad_down_lora_b,
        )
        names = self._LORA_NAMES + tuple("grad_" + n for n in self._LORA_NAMES)
        shapes = self._lora_shapes() * 2
        for name, t, (shape, doc) in zip(names, tensors, shapes):
            check_tensor(name, t, torch.bfloat16, shape, doc)
        ptrs = [t.data_ptr() for t in tensors]
        for i in range(6, 12):
            for j in range(12):
                if i != j and ptrs[i] == ptrs[j]:
                    raise ValueError(f"{names[i]} must not share memory with {names[j]}")
        self._lora = tensors
        self._push_lora()

    def update_lora_weights(self) -> None:
        """Re-reads the registered LoRA tensors' storage (needed only if a tensor's ``.data`` was replaced;
        in-place optimizer updates are seen anyway: nothing is repacked)."""
        if not self._lora:
            raise RuntimeError(f"{type(self).__name__}: update_lora_weights before init_lora_weights")
        self._push_lora()

    def _push_lora(self) -> None:
        for name, t, (shape, doc) in zip(
            self._LORA_NAMES + tuple("grad_" + n for n in self._LORA_NAMES), self._lora, self._lora_shapes() * 2
        ):
            check_tensor(name, t, torch.bfloat16, shape, doc)
        self._lora_ptrs = tuple(t.data_ptr() for t in self._lora)
        self._layer.set_lora(*self._lora_ptrs)

    # -- compute ------------------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        save_for_backward: bool = True,
    ) -> torch.Tensor:
        """Routed experts with LoRA: ``out[t] = sum_j weights[t,j] * y(expert_ids[t,j], hidden_states[t])``.

        Args:
            hidden_states: bf16 CPU [qlen, H], contiguous, 0 <= qlen <= chunked_prefill_size (qlen 0, as in
                inference, gives an empty output; its backward gives empty gradients and LoRA gradients 0).
            expert_ids: int64 CPU [qlen, k], 1 <= k <= num_experts_per_tok; ids outside [0, E) contribute
                nothing.
            weights: float32 CPU [qlen, k].
            save_for_backward: push the activations backward needs on this layer's cache stack (at most
                max_cache_depth forwards may wait for their backward; with share_cache_pool, at most
                max_cache_depth for all layers sharing the pool together, else RuntimeError naming the
                layers holding them).

        Returns:
            A new bf16 CPU tensor [qlen, H].
        """
        H = self.hidden_size
        check_tensor("hidden_states", hidden_states, torch.bfloat16, (None, H), "[qlen, hidden_size]")
        qlen = hidden_states.shape[0]
        if qlen > self.chunked_prefill_size:
            raise ValueError(
                f"hidden_states has qlen={qlen} tokens; SFT forward takes 0..chunked_prefill_size="
                f"{self.chunked_prefill_size} tokens per call"
            )
        k = check_routing("expert_ids", expert_ids, "weights", weights, qlen, self.num_experts_per_tok)
        if not getattr(self, "_weights_loaded", False):
            raise RuntimeError(
                f"{type(self).__name__} (layer {self.layer_idx}): forward before the base weights were loaded; "
                "call load_weights_from_tensors first"
            )
        if self._needs_lora() and not self._lora:
            raise RuntimeError(
                f"{type(self).__name__} (layer {self.layer_idx}): forward before init_lora_weights"
            )
        depth = self._layer.cache_depth  # the C++ layer's stack: this layer's waiting forwards
        if save_for_backward and depth >= self.max_cache_depth:
            raise RuntimeError(
                f"{type(self).__name__} (layer {self.layer_idx}): {depth} forward(s) already wait "
                f"for their backward and max_cache_depth={self.max_cache_depth}; call backward first or "
                "create the wrapper with a larger max_cache_depth"
            )
        if self._lora and tuple(t.data_ptr() for t in self._lora) != self._lora_ptrs:
            self._push_lora()  # a LoRA tensor's .data was replaced: follow it
        # The C++ layer keeps the cache stack (its depth limit, shared pools, the shape each backward needs);
        # an empty batch (qlen 0) is an entry there too.
        output = torch.empty((qlen, H), dtype=torch.bfloat16)
        self._layer.forward(
            self._pool(),
            qlen,
            k,
            expert_ids.data_ptr(),
            weights.data_ptr(),
            hidden_states.data_ptr(),
            output.data_ptr(),
            bool(save_for_backward),
        )
        return output

    def backward(
        self,
        grad_output: torch.Tensor,
        optimizer_grad_scale: float = 1.0,
        accumulate_optimizer_grads: bool = False,
    ):
        """Backward of the newest cached forward (LIFO).

        Args:
            grad_output: bf16 CPU [qlen, H] for that forward.
            optimizer_grad_scale: multiplies the LoRA gradients written (e.g. 1/world_size).
            accumulate_optimizer_grads: add to the grad tensors instead of overwriting them.

        Returns:
            (grad_input bf16 [qlen, H], grad_weights float32 [qlen, k]). The six LoRA gradients are written
            into the grad tensors of init_lora_weights (experts with no tokens: 0, or unchanged when
            accumulating).
        """
        qlen, k = self._layer.next_backward_shape()  # RuntimeError when no forward is cached
        check_tensor("grad_output", grad_output, torch.bfloat16, (qlen, self.hidden_size), "[qlen, hidden_size]")
        if isinstance(optimizer_grad_scale, bool) or not isinstance(optimizer_grad_scale, (int, float)):
            raise TypeError(f"optimizer_grad_scale must be a number, got {type(optimizer_grad_scale).__name__}")
        if self._lora and tuple(t.data_ptr() for t in self._lora) != self._lora_ptrs:
            self._push_lora()
        grad_input = torch.empty((qlen, self.hidden_size), dtype=torch.bfloat16)
        grad_weights = torch.empty((qlen, k), dtype=torch.float32)
        self._layer.backward(
            self._pool(),
            grad_output.data_ptr(),
            grad_input.data_ptr(),
            grad_weights.data_ptr(),
            bool(accumulate_optimizer_grads),
            float(optimizer_grad_scale),
        )
        return grad_input, grad_weights

    def _needs_lora(self) -> bool:
        return True
