"""``NativeMoEWrapper``: kt's C++ ``MoeLayer`` behind the inference API, the ``BF16`` backend and the base
of the quantized ones (``AMXMoEWrapper`` in ``utils/amx.py``, ``GeneralMoEWrapper`` in ``utils/moe_kernel.py``,
which differ only in the kernel paths they may use).

The methods and their formats (the table itself is C++'s: ``kt_kernel.methods``):

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
- ``FP8`` (FP8MoEWrapper, ``utils/fp8.py``): FP8 E4M3 weights with a scale per 128 x 128 block
  (kt-fp8-block128-v1), held as shipped; activations bf16.

- ``RAWINT4`` and ``GPTQ_INT4`` (AMXMoEWrapper): native int4 checkpoints read as stored from ``weight_path``:
  compressed-tensors pack-quantized INT4 (Kimi-K2) and GPTQ (sym, desc_act false). Both are q * scale with
  q in [-8, 7] per group of K, held exactly as kt-int4-group{G}-sym-v1 (G the checkpoint's; docs/FORMATS.md),
  activations int8 per token and group as for AMXINT4_KGroup.
- ``FP8_PERCHANNEL`` (FP8PerChannelMoEWrapper, ``utils/fp8.py``): FP8 E4M3 with a scale per output channel,
  held as kt-fp8-block128-v1 (each row's scale repeated per 128-k block); ``MXFP4`` / ``MXFP8``
  (MXMoEWrapper, ``utils/mx.py``): OCP MX codes with an E8M0 scale per 32 k; ``LLAMAFILE``
  (LlamafileMoEWrapper, ``utils/llamafile.py``): a GGUF checkpoint's expert blocks as stored.

Every inference method of the original kt-kernel is implemented.
"""

from __future__ import annotations

import errno
import json
import math
import numbers
import os
from typing import Optional

import torch

from .. import _native
from .._args import InferenceArgs
from .._checks import check_expert_map, check_expert_weights, check_routing, check_tensor
from ..experts_base import BaseMoEWrapper
from ..methods import GROUP_SIZES, METHOD_FORMATS

# Kept for code that imported them from kt_kernel.utils.amx: the C++ table, not a copy.
_METHOD_FORMATS = METHOD_FORMATS
_IMPLEMENTED_METHODS = frozenset(METHOD_FORMATS)


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

    def __init__(self, *args, **kwargs):
        """Takes an ``InferenceArgs``, or its fields as ``KTMoEWrapper`` passes them (method default "BF16")."""
        a = InferenceArgs.of(args, kwargs, method="BF16")
        if a.method not in _IMPLEMENTED_METHODS | self._EXTRA_METHODS:
            raise NotImplementedError(
                f"NativeMoEWrapper: method {a.method!r} is not implemented yet in kt "
                f"(implemented: {sorted(_IMPLEMENTED_METHODS)})"
            )
        super().__init__(a)
        weight_format, gguf_types = self._layer_format(a)
        # Scratch is sized for chunked_prefill_size tokens; the C++ config check names any bad field.
        layer_args = dict(
            num_experts=a.num_experts,
            top_k=a.num_experts_per_tok,
            hidden=a.hidden_size,
            intermediate=a.moe_intermediate_size,
            max_len=a.chunked_prefill_size,
            isa=self._kernel_isa(_native.ISA),
            format=weight_format,
            group_size=_check_group_size(_native_group_size(a), weight_format),
            swiglu_limit=_check_swiglu("swiglu_limit", a.swiglu_limit, a.method),
            swiglu_alpha=_check_swiglu("swiglu_alpha", a.swiglu_alpha, a.method),
        )
        if gguf_types is not None:
            layer_args["gguf_types"] = gguf_types
        self._node_pools = None
        if self.tensor_parallel:
            # threadpool_count parts along moe_intermediate_size, part i on sub-pool i (NUMA node numa_nodes[i]);
            # the same methods as MoeLayer, with the NodePools where MoeLayer takes the ThreadPool (_pool()).
            self._node_pools = _native.get_node_pools(self.threadpool_count, self.cpuinfer_threads, self.numa_nodes)
            self._moe = _native._kt.TpMoeLayer(
                tp=self.threadpool_count, numa_nodes=self._node_pools.nodes, **layer_args
            )
        else:
            self._moe = _native._kt.MoeLayer(**layer_args)

    # Methods a subclass runs beyond the C++ method table's loadable ones (LLAMAFILE: utils/llamafile.py).
    _EXTRA_METHODS = frozenset()

    def _layer_format(self, a):
        """The C++ layer's expert format for ``a.method`` and, for GGUF formats, the ggml type ids of gate, up
        and down (None otherwise)."""
        return METHOD_FORMATS[a.method], None

    def _pool(self):
        """The threads this layer runs on: its NUMA sub-pools (tensor parallel), else the process-wide pool."""
        if self._node_pools is not None:
            return self._node_pools
        return _native.current_thread_pool()

    @property
    def numa_placement(self) -> Optional[list]:
        """The NUMA node of each tensor-parallel part (-1: not placed, NUMA unavailable), or None with one pool."""
        return None if self._node_pools is None else list(self._node_pools.nodes)

    @staticmethod
    def _kernel_isa(process_isa: str) -> str:
        """The kernel path for this backend given the process's (KT_ISA-capped) best path."""
        return process_isa

    @property
    def weight_format(self) -> str:
        """How the expert weights are held: 'bf16', 'int8', 'int4', 'int4_asym', 'int4_group_sym' or
        'int4_group_asym' (kt's ExpertFormat names; see kt_kernel.methods)."""
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
            An FP8 checkpoint loads only with method FP8 (ValueError naming it for another method).
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


def _native_group_size(a: InferenceArgs):
    """RAWINT4 / GPTQ_INT4 hold the checkpoint's groups: its G when weight_path is a native int4 checkpoint or
    a kt convert folder (its manifest's group_size), else the group_size argument (bf16 weights, quantized
    here)."""
    if a.method not in ("RAWINT4", "GPTQ_INT4") or a.weight_path is None:
        return a.group_size
    path = os.fspath(a.weight_path)
    manifest = os.path.join(path, "kt_manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            g = json.load(f).get("group_size", 0)
        return g if g else a.group_size  # 0: another layout, which load_weights names
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return a.group_size  # load_weights reports the folder
    with open(config) as f:
        quant = json.load(f).get("quantization_config") or {}
    if quant.get("quant_method") not in ("compressed-tensors", "gptq"):
        return a.group_size  # a bf16 checkpoint: quantized at load with group_size
    return _native._kt.hf_int4_group_size(path)


#: The methods that take swiglu_limit / swiglu_alpha (as the original kt-kernel: its MXFP4 / MXFP8 models are
#: the ones trained with them); kt's layer honours them for every format, but other methods refuse them.
SWIGLU_METHODS = ("MXFP4", "MXFP8")


def _check_swiglu(name: str, value, method: str) -> float:
    """swiglu_limit / swiglu_alpha as the C++ layer takes them: a finite number >= 0 (0: off), non-zero only
    with the MX methods."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0: off), got {value!r}")
    if value != 0 and method not in SWIGLU_METHODS:
        raise ValueError(
            f"{name}={value!r} is only supported by methods {', '.join(SWIGLU_METHODS)}; method {method} "
            f"computes silu(gate) * up: pass {name}=0.0"
        )
    return value


def _check_group_size(group_size, weight_format: str) -> int:
    """group_size as the C++ layer takes it; only the group formats use it (the others ignore it)."""
    if not weight_format.startswith("int4_group"):
        return 128
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise ValueError(
            f"group_size must be 32, 64 or 128 for the K-group int4 methods, got {group_size!r}; it must "
            "also divide hidden_size and moe_intermediate_size"
        )
    return group_size
