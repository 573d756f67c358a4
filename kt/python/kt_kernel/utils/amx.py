"""Backends computed by kt's C++ ``MoeLayer``.

- ``BF16`` (NativeMoEWrapper): the experts' gate/up/down matrices in bfloat16, on the kernel path chosen at
  import (``kt_kernel.__cpu_variant__``).
- ``AMXINT8`` (AMXMoEWrapper): weights quantized online at load to symmetric int8 per output channel
  (kt-int8-channel-v1), activations quantized per token; AMX tiles (tdpbssd) where the CPU has them, else the
  best path it has (AVX512-VNNI, Highway AVX3/AVX2, scalar): ``wrapper.isa`` names it.
- ``AMXINT4`` (AMXMoEWrapper): symmetric int4 per output channel (kt-int4-channel-v1, scale = absmax / 7),
  activations int8 per token; AMX tiles (nibbles expanded to int8, tdpbssd) where present, else the best path.
- kt extensions (the original has these kernels but no KTMoEWrapper method): ``AMXINT4_KGroup``, symmetric
  int4 with a scale per ``group_size`` consecutive k of a row (kt-int4-group{G}-sym-v1), and
  ``AMXINT4_1KGroup``, asymmetric int4 with a scale and zero point per group (kt-int4-group{G}-asym-v1,
  AWQ-style); activations int8 per token and group. ``group_size`` (32, 64 or 128; default 128) is the
  KTMoEWrapper keyword of the same name. ``AMXINT4_1``: asymmetric int4 with a scale and zero point per
  output channel (kt-int4-channel-asym-v1, the original's INT4_1), activations per token.

- ``FP8`` (FP8MoEWrapper): FP8 E4M3 weights with a scale per 128 x 128 block (kt-fp8-block128-v1:
  DeepSeek-V3/R1, Qwen3-FP8, MiniMax-M2 as shipped), held as given and decoded in registers by the kernels;
  activations bf16. ``load_weights`` reads an FP8 Hugging Face folder (``weight`` + ``weight_scale_inv``)
  without a bf16 copy; ``load_weights_from_tensors`` takes float8_e4m3fn tensors with their scales (or bf16
  tensors, quantized as DeepSeek does: scale = amax / 448 per block).

The other methods of the original kt-kernel (RAWINT4, FP8_PERCHANNEL, GPTQ_INT4) are not implemented:
KTMoEWrapper raises NotImplementedError for them.
"""

from __future__ import annotations

import errno
import os
from typing import List, Optional

import torch

from .. import _native
from .._checks import check_expert_map, check_expert_weights, check_routing, check_tensor
from ..experts_base import BaseMoEWrapper

# Method -> the C++ layer's expert format.
_METHOD_FORMATS = {
    "BF16": "bf16",
    "AMXINT8": "int8",
    "MOE_INT8": "int8",
    "AMXINT4": "int4",
    "MOE_INT4": "int4",
    "AMXINT4_KGroup": "int4_group_sym",
    "MOE_INT4_KGroup": "int4_group_sym",
    "AMXINT4_1KGroup": "int4_group_asym",
    "MOE_INT4_1KGroup": "int4_group_asym",
    "AMXINT4_1": "int4_asym",
    "MOE_INT4_1": "int4_asym",
    "FP8": "fp8_block",
}
_IMPLEMENTED_METHODS = frozenset(_METHOD_FORMATS)


class NativeMoEWrapper(BaseMoEWrapper):
    """BF16 routed experts on the CPU.

    Usage::

        moe = KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=k, hidden_size=H,
                           moe_intermediate_size=I, gpu_experts_mask=None, cpuinfer_threads=8,
                           threadpool_count=1, weight_path=None, chunked_prefill_size=512, method="BF16")
        moe.load_weights_from_tensors(gate [E,I,H], up [E,I,H], down [E,H,I], None)
        out = moe.forward(x [T,H] bf16, ids [T,k] int64, weights [T,k] float32, cuda_stream=None)

    Per token t: ``out[t] = bf16(sum_j weights[t,j] * W_down[e] (silu(W_gate[e] x) * W_up[e] x))`` over its
    slots j with expert e = ids[t,j]; ids < 0, >= num_experts, or with ``gpu_experts_mask[e]`` set contribute
    nothing (those experts run elsewhere). The same expert may appear in several slots of a token.
    """

    def __init__(
        self,
        layer_idx: int,
        num_experts: int,
        num_experts_per_tok: int,
        hidden_size: int,
        moe_intermediate_size: int,
        gpu_experts_mask: Optional[torch.Tensor],
        cpuinfer_threads: int,
        threadpool_count: int,
        weight_path: str,
        chunked_prefill_size: int,
        cpu_save: bool = False,
        max_deferred_experts_per_token: Optional[int] = None,
        method: str = "BF16",
        numa_nodes: Optional[List[int]] = None,
        group_size: int = 128,
    ):
        if method not in _IMPLEMENTED_METHODS:
            raise NotImplementedError(
                f"NativeMoEWrapper: method {method!r} is not implemented yet in kt "
                f"(implemented: {sorted(_IMPLEMENTED_METHODS)})"
            )
        super().__init__(
            layer_idx=layer_idx,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            hidden_size=hidden_size,
            moe_intermediate_size=moe_intermediate_size,
            gpu_experts_mask=gpu_experts_mask,
            cpuinfer_threads=cpuinfer_threads,
            threadpool_count=threadpool_count,
            weight_path=weight_path,
            chunked_prefill_size=chunked_prefill_size,
            cpu_save=cpu_save,
            max_deferred_experts_per_token=max_deferred_experts_per_token,
            method=method,
            numa_nodes=numa_nodes,
        )
        # Scratch is sized for chunked_prefill_size tokens; the C++ config check names any bad field.
        self._moe = _native._kt.MoeLayer(
            num_experts=num_experts,
            top_k=num_experts_per_tok,
            hidden=hidden_size,
            intermediate=moe_intermediate_size,
            max_len=chunked_prefill_size,
            isa=self._kernel_isa(_native.ISA),
            format=_METHOD_FORMATS[method],
            group_size=_check_group_size(group_size, _METHOD_FORMATS[method]),
        )

    @staticmethod
    def _kernel_isa(process_isa: str) -> str:
        """The kernel path for this backend given the process's (KT_ISA-capped) best path."""
        return process_isa

    @property
    def weight_format(self) -> str:
        """How the expert weights are held: 'bf16', 'int8', 'int4', 'int4_asym', 'int4_group_sym' or
        'int4_group_asym' (kt's ExpertFormat names; see _METHOD_FORMATS)."""
        return self._moe.format

    @property
    def group_size(self) -> int:
        """G of the group-wise int4 formats; 0 for the others."""
        return self._moe.group_size

    @property
    def isa(self) -> str:
        """The kernel path this layer runs (KT_ISA spelling)."""
        return self._moe.isa

    @property
    def weights_loaded(self) -> bool:
        return self._moe.loaded

    def load_weights(self, physical_to_logical_map_cpu: Optional[torch.Tensor] = None) -> None:
        """Loads this layer's experts (layer ``layer_idx``) from ``weight_path``.

        ``weight_path`` is either a Hugging Face folder (config.json + safetensors, bf16 experts; integer
        methods quantize here, as ``load_weights_from_tensors`` does) or a folder written by
        ``kt convert --method <this method's layout>`` (checked against its kt_manifest.json: layout, shapes
        and CRC32C checksums). Experts are streamed one at a time per thread into the packed weights.

        Args:
            physical_to_logical_map_cpu: int64 CPU tensor [E] or None (identity): physical expert i (the id
                used in topk_ids) computes with logical expert ``map[i]`` of the checkpoint.

        A failed load (any error below) leaves the weights loaded before, if any, in use: the new ones are
        loaded into separate storage and swapped in only once complete and valid.

        Raises:
            ValueError: weight_path is None, or the folder's shapes/layout differ from this layer's (the
                message names the file, tensor and expected value), or a weight is NaN/Inf (integer methods).
            FileNotFoundError / NotADirectoryError: weight_path does not exist / is not a folder (with errno
                and filename set).
            OSError: a missing or corrupt file inside it (checksum mismatch, truncation).
            NotImplementedError: FP8 checkpoints (not supported yet).
        """
        if self.weight_path is None:
            raise ValueError(
                f"{type(self).__name__}.load_weights: weight_path is None; pass weight_path= to KTMoEWrapper "
                "(a Hugging Face or kt convert folder) or use load_weights_from_tensors"
            )
        path = os.fspath(self.weight_path)
        if not os.path.exists(path):
            raise FileNotFoundError(
                errno.ENOENT, f"{type(self).__name__}.load_weights: weight_path does not exist", path
            )
        if not os.path.isdir(path):
            raise NotADirectoryError(
                errno.ENOTDIR,
                f"{type(self).__name__}.load_weights: weight_path must be a folder (Hugging Face or kt convert "
                "output), got a file",
                path,
            )
        map_ptr = self._check_map(physical_to_logical_map_cpu)
        self.last_load_stats = self._moe.load_from_path(
            self.weight_path, self.layer_idx, self.method, self.group_size, map_ptr, self._pool()
        )

    def _check_map(self, physical_to_logical_map_cpu: Optional[torch.Tensor]) -> int:
        """Validates the physical -> logical map; its address, or 0 for None (identity)."""
        mapping = check_expert_map(physical_to_logical_map_cpu, self.num_experts)
        if mapping is None:
            return 0
        self._map_keepalive = mapping
        return mapping.data_ptr()

    def load_weights_from_tensors(
        self,
        gate_proj: torch.Tensor,
        up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        physical_to_logical_map_cpu: Optional[torch.Tensor] = None,
    ) -> None:
        """Packs the experts' weights into the kernel layout.

        Args:
            gate_proj: bf16 CPU tensor [E, I, H] (E = num_experts, I = moe_intermediate_size,
                H = hidden_size), contiguous.
            up_proj: bf16 CPU tensor [E, I, H], contiguous.
            down_proj: bf16 CPU tensor [E, H, I], contiguous.
            physical_to_logical_map_cpu: int64 CPU tensor [E] or None (identity). Physical expert i (the id
                used in topk_ids) computes with logical expert ``map[i]`` of the weight tensors. Every entry
                must be in [0, E); an expert may be replicated (appear more than once).

        The tensors are copied; they may be freed afterwards. Loading again replaces the weights once the new
        ones are complete and valid; a failed load leaves the previous weights in use.
        """
        check_expert_weights(
            gate_proj, up_proj, down_proj, self.num_experts, self.moe_intermediate_size, self.hidden_size
        )
        map_ptr = self._check_map(physical_to_logical_map_cpu)
        self._moe.load_weights(
            gate_proj.data_ptr(), up_proj.data_ptr(), down_proj.data_ptr(), map_ptr, self._pool()
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        cuda_stream=None,
    ) -> torch.Tensor:
        """Routed experts' weighted sum for ``qlen`` tokens, computed synchronously.

        Args:
            hidden_states: bf16 CPU tensor [qlen, H], contiguous, qlen <= chunked_prefill_size.
            topk_ids: int64 CPU tensor [qlen, k], 1 <= k <= num_experts_per_tok. Entries outside
                [0, num_experts) (e.g. -1 padding) contribute nothing.
            topk_weights: float32 CPU tensor [qlen, k].
            cuda_stream: must be None (CPU tensors in and out). Ordering with a GPU stream comes with the
                asynchronous submit_forward/sync_forward.

        Returns:
            A new bf16 CPU tensor [qlen, H].
        """
        if cuda_stream is not None:
            raise self._not_implemented(
                "forward with a cuda_stream (GPU tensors / stream ordering; pass cuda_stream=None and CPU "
                "tensors)"
            )
        H = self.hidden_size
        check_tensor("hidden_states", hidden_states, torch.bfloat16, (None, H), "[qlen, hidden_size]")
        qlen = hidden_states.shape[0]
        if qlen > self.chunked_prefill_size:
            raise ValueError(
                f"hidden_states has qlen={qlen} tokens, more than chunked_prefill_size="
                f"{self.chunked_prefill_size}; split the batch into chunks of at most chunked_prefill_size "
                "tokens (automatic chunking comes later)"
            )
        k = check_routing("topk_ids", topk_ids, "topk_weights", topk_weights, qlen, self.num_experts_per_tok)
        if not self._moe.loaded:
            raise RuntimeError(
                f"{type(self).__name__} (layer {self.layer_idx}): forward called before the expert weights "
                "were loaded; call load_weights or load_weights_from_tensors first"
            )
        mask = self._checked_mask()
        output = torch.empty((qlen, H), dtype=torch.bfloat16)
        if qlen == 0:
            return output
        self._moe.forward(
            self._pool(),
            qlen,
            k,
            topk_ids.data_ptr(),
            topk_weights.data_ptr(),
            hidden_states.data_ptr(),
            output.data_ptr(),
            0 if mask is None else mask.data_ptr(),
        )
        return output


def _check_group_size(group_size, weight_format: str) -> int:
    """group_size as the C++ layer takes it; only the group formats use it (the others ignore it)."""
    if not weight_format.startswith("int4_group"):
        return 128
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in (32, 64, 128):
        raise ValueError(
            f"group_size must be 32, 64 or 128 for the K-group int4 methods, got {group_size!r}; it must "
            "also divide hidden_size and moe_intermediate_size"
        )
    return group_size


class AMXMoEWrapper(NativeMoEWrapper):
    """``AMXINT8``, ``AMXINT4``, ``AMXINT4_1``, ``AMXINT4_KGroup``, ``AMXINT4_1KGroup``: quantized experts, quantized online
    by ``load_weights_from_tensors``.

    Uses AMX tiles where the CPU has them (and Linux grants the permission); elsewhere the best path the CPU
    has, named by ``wrapper.isa``. ``load_weights`` reads ``weight_path`` (an HF folder,
    quantized at load, or ``kt convert --method AMXINT8`` output).
    """


class FP8MoEWrapper(NativeMoEWrapper):
    """``FP8``: experts held as FP8 E4M3 with one fp32 scale per 128 x 128 block (kt-fp8-block128-v1), on the
    best path the CPU has (``wrapper.isa``). ``load_weights`` reads an FP8 Hugging Face folder as stored (or a
    ``kt convert --method FP8`` folder)."""

    def load_weights_from_tensors(
        self,
        gate_proj: torch.Tensor,
        up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        physical_to_logical_map_cpu: Optional[torch.Tensor] = None,
        gate_scale_inv: Optional[torch.Tensor] = None,
        up_scale_inv: Optional[torch.Tensor] = None,
        down_scale_inv: Optional[torch.Tensor] = None,
    ) -> None:
        """Packs the experts' weights.

        Args:
            gate_proj, up_proj: torch.float8_e4m3fn CPU tensors [E, I, H]; down_proj [E, H, I]; contiguous
                (torch.uint8 tensors of the same E4M3 bytes are accepted too, for torch < 2.1).
                bf16 tensors are accepted too (then without scales): they are quantized per 128 x 128 block,
                scale = amax / 448, as DeepSeek's quantizer does.
            physical_to_logical_map_cpu: int64 CPU tensor [E] or None (identity), as for the other methods.
            gate_scale_inv, up_scale_inv: float32 CPU tensors [E, ceil(I/128), ceil(H/128)];
            down_scale_inv: [E, ceil(H/128), ceil(I/128)]: each expert's ``weight_scale_inv`` (the weight is
                fp8 value * scale_inv[n // 128][k // 128]).
        """
        if gate_proj.dtype == torch.bfloat16:
            if any(s is not None for s in (gate_scale_inv, up_scale_inv, down_scale_inv)):
                raise ValueError("bf16 weights take no scales (they are quantized here); pass float8_e4m3fn "
                                 "weights with their *_scale_inv")
            super().load_weights_from_tensors(gate_proj, up_proj, down_proj, physical_to_logical_map_cpu)
            return
        E, I, H = self.num_experts, self.moe_intermediate_size, self.hidden_size
        # float8_e4m3fn where torch has it (>= 2.1); uint8 holding the E4M3 bytes otherwise (or by choice).
        fp8 = getattr(torch, "float8_e4m3fn", torch.uint8)
        if gate_proj.dtype == torch.uint8:
            fp8 = torch.uint8
        check_tensor("gate_proj", gate_proj, fp8, (E, I, H), "[E, I, H]")
        check_tensor("up_proj", up_proj, fp8, (E, I, H), "[E, I, H]")
        check_tensor("down_proj", down_proj, fp8, (E, H, I), "[E, H, I]")
        bi, bh = -(-I // 128), -(-H // 128)
        for name, t, shape, doc in (
            ("gate_scale_inv", gate_scale_inv, (E, bi, bh), "[E, ceil(I/128), ceil(H/128)]"),
            ("up_scale_inv", up_scale_inv, (E, bi, bh), "[E, ceil(I/128), ceil(H/128)]"),
            ("down_scale_inv", down_scale_inv, (E, bh, bi), "[E, ceil(H/128), ceil(I/128)]"),
        ):
            if t is None:
                raise ValueError(f"{name} is required with float8_e4m3fn weights (the 128 x 128 block scales, "
                                 f"float32 {doc})")
            check_tensor(name, t, torch.float32, shape, doc)
        map_ptr = self._check_map(physical_to_logical_map_cpu)
        self._moe.load_weights_fp8(
            gate_proj.data_ptr(), up_proj.data_ptr(), down_proj.data_ptr(), gate_scale_inv.data_ptr(),
            up_scale_inv.data_ptr(), down_scale_inv.data_ptr(), map_ptr, self._pool()
        )
