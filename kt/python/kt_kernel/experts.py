"""KTMoEWrapper: the entry point that builds the CPU backend of one MoE layer's routed experts.

``KTMoEWrapper(...)`` validates ``mode`` and ``method`` and returns a backend object (it is a factory: the
result is not a KTMoEWrapper instance). The arguments, defaults, method names and validation messages are
those of the original kt-kernel, so code written against it keeps working.

What kt implements: ``mode="inference"`` with ``method`` "BF16" (``NativeMoEWrapper``), "AMXINT8",
"AMXINT4" (``AMXMoEWrapper``), "MOE_INT8", "MOE_INT4" (``GeneralMoEWrapper``), and the kt extensions in
``KT_INFERENCE_EXTENSIONS`` (int4 with zero points and group-wise int4; ``group_size`` keyword), "FP8"
(``FP8MoEWrapper``: E4M3 with 128 x 128 block scales, read as shipped), "FP8_PERCHANNEL"
(``FP8PerChannelMoEWrapper``: E4M3 with a scale per output channel), "MXFP4" and "MXFP8" (``MXMoEWrapper``:
OCP MX codes with E8M0 scales per 32, with ``swiglu_limit`` / ``swiglu_alpha``), "LLAMAFILE"
(``LlamafileMoEWrapper``: a GGUF checkpoint's expert blocks as stored, Q4_0 .. Q6_K, BF16/F16/F32); weights
come from ``load_weights_from_tensors`` (bf16 tensors, quantized online) or from ``load_weights``, which
reads ``weight_path``: a Hugging Face bf16 folder or a ``kt convert`` output folder. ``mode="sft"`` with
every method of ``SFT_METHODS``: ``AMXBF16_SFT``, ``AMXINT8_SFT``, ``AMXINT4_SFT``, ``AMXINT4_1_SFT``,
``AMXINT4_KGroup_SFT``, ``AMXINT4_1KGroup_SFT`` and each ``_SkipLoRA`` variant (``AMXSFTMoEWrapper``, see
``kt_kernel.sft.amx``: LoRA forward with an activation cache, backward giving grad_input, the router and
LoRA gradients; weights from ``load_weights_from_tensors``). "RAWINT4" (compressed-tensors pack-quantized
INT4, Kimi-K2; ``RawInt4MoEWrapper``, which also takes the checkpoint's packed tensors) and "GPTQ_INT4" (GPTQ
sym, desc_act false; ``AMXMoEWrapper``) load their checkpoints from ``weight_path`` as stored (the group size
is the checkpoint's); "LLAMAFILE" runs a GGUF checkpoint's expert blocks as stored. Every method of the
original is implemented; kt never substitutes a different method.

Example::

    gpu_mask = torch.zeros(8, dtype=torch.bool)   # or None: all experts on the CPU
    gpu_mask[[0, 2, 5]] = True                     # experts 0, 2, 5 run on the GPU instead
    moe = KTMoEWrapper(layer_idx=0, num_experts=8, num_experts_per_tok=2, hidden_size=4096,
                       moe_intermediate_size=14336, gpu_experts_mask=gpu_mask, cpuinfer_threads=32,
                       threadpool_count=1, weight_path=None, chunked_prefill_size=8192, method="BF16")
    moe.load_weights_from_tensors(gate_proj, up_proj, down_proj, None)
    out = moe.forward(hidden_states, topk_ids, topk_weights, cuda_stream=None)
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ._args import InferenceArgs, SftArgs
from .experts_base import BaseMoEWrapper, KExpertsCPUBuffer
from .methods import METHOD_FORMATS
from .utils.amx import AMXMoEWrapper
from .utils.fp8 import FP8MoEWrapper, FP8PerChannelMoEWrapper
from .utils.llamafile import LlamafileMoEWrapper
from .utils.moe_kernel import GeneralMoEWrapper
from .utils.mx import MXMoEWrapper
from .utils.native import NativeMoEWrapper
from .utils.rawint4 import RawInt4MoEWrapper

__all__ = [
    "KTMoEWrapper",
    "INFERENCE_METHODS",
    "KT_INFERENCE_EXTENSIONS",
    "SFT_METHODS",
    "BaseMoEWrapper",
    "KExpertsCPUBuffer",
]

# Valid methods for each mode (the original kt-kernel's names).
INFERENCE_METHODS = frozenset(
    [
        "AMXINT4",
        "AMXINT8",
        "RAWINT4",
        "FP8",
        "BF16",
        "FP8_PERCHANNEL",
        "GPTQ_INT4",
        "LLAMAFILE",
        "MOE_INT4",
        "MOE_INT8",
    ]
)

# kt's inference methods beyond the original's list (its C++ has these kernels, its KTMoEWrapper does not
# expose them). INFERENCE_METHODS stays the original's set; KTMoEWrapper accepts both.
#   AMXINT4_KGroup / MOE_INT4_KGroup    int4, a symmetric scale per group_size k (kt-int4-group{G}-sym-v1)
#   AMXINT4_1KGroup / MOE_INT4_1KGroup  int4, scale and zero point per group (kt-int4-group{G}-asym-v1, AWQ)
#   AMXINT4_1 / MOE_INT4_1              int4, scale and zero point per output channel (kt-int4-channel-asym-v1,
#                                       the original's INT4_1)
# The AMX* names use AMX tiles where present; the MOE_* names stop at AVX512-VNNI.
#   MXFP4 / MXFP8                       OCP MX codes with an E8M0 scale per 32 k (DeepSeek-V4-Flash, MiniMax-M3):
#                                       later kt-kernel releases have them; the seed's list does not
KT_INFERENCE_EXTENSIONS = frozenset(
    ["AMXINT4_1", "AMXINT4_KGroup", "AMXINT4_1KGroup", "MOE_INT4_1", "MOE_INT4_KGroup", "MOE_INT4_1KGroup",
     "MXFP4", "MXFP8"]
)

SFT_METHODS = frozenset(
    [
        "AMXBF16_SFT",
        "AMXINT8_SFT",
        "AMXINT4_SFT",
        "AMXINT4_1_SFT",
        "AMXINT4_KGroup_SFT",
        "AMXINT4_1KGroup_SFT",
        "AMXBF16_SFT_SkipLoRA",
        "AMXINT8_SFT_SkipLoRA",
        "AMXINT4_SFT_SkipLoRA",
        "AMXINT4_1_SFT_SkipLoRA",
        "AMXINT4_KGroup_SFT_SkipLoRA",
        "AMXINT4_1KGroup_SFT_SkipLoRA",
    ]
)

# Inference methods kt implements (the C++ method table's loadable ones), with their backend class: the
# portable kernels for MOE_*, FP8MoEWrapper for FP8, AMX tiles where present for the others.
def _backend_of(method: str):
    if method == "BF16":
        return NativeMoEWrapper
    if method == "FP8":
        return FP8MoEWrapper
    if method == "RAWINT4":
        return RawInt4MoEWrapper
    if method == "FP8_PERCHANNEL":
        return FP8PerChannelMoEWrapper
    if method in ("MXFP4", "MXFP8"):
        return MXMoEWrapper
    return GeneralMoEWrapper if method.startswith("MOE_") else AMXMoEWrapper


_INFERENCE_BACKENDS = {method: _backend_of(method) for method in METHOD_FORMATS}
# GGUF checkpoints' blocks as stored: no kt layout (kt convert does not write it), so not in the C++ method table.
_INFERENCE_BACKENDS["LLAMAFILE"] = LlamafileMoEWrapper

# Where each missing inference method is planned, for the NotImplementedError message.
_PLANNED = {
    # Every inference method has a backend now; a method listed before its backend lands goes here.
}


class KTMoEWrapper:
    """Factory for the CPU backend of one MoE layer's routed experts (inference or SFT).

    ``KTMoEWrapper(...)`` returns the backend for ``mode``/``method``.

    Args:
        layer_idx: Index of the layer (>= 0).
        num_experts: Number of routed experts E.
        num_experts_per_tok: Experts per token (top-k).
        hidden_size: Hidden size H.
        moe_intermediate_size: Intermediate size I of one expert.
        gpu_experts_mask: bool CPU tensor [E] or None (all experts on the CPU). ``mask[e] = True``:
            expert e runs on the GPU, so the CPU result skips it. The tensor is kept and read at every
            forward, so flipping its bits later takes effect. Inference only.
        cpuinfer_threads: Worker threads (one pool shared by all layers of the process; see
            ``kt_kernel._native``).
        threadpool_count: NUMA sub-pools (inference). 1 (with numa_nodes None): one process-wide pool. N > 1:
            tensor parallelism, the layer split N ways along moe_intermediate_size, part i on sub-pool i of
            cpuinfer_threads / N threads pinned to its NUMA node, weights bound there; N must divide
            moe_intermediate_size and be at most cpuinfer_threads. SFT: accepted, one pool.
        weight_path: Folder ``load_weights`` reads (inference): a Hugging Face checkpoint with bf16
            experts (quantized at load for the integer methods) or a ``kt convert`` folder of this
            method's layout; for method LLAMAFILE a GGUF checkpoint (a .gguf file, a part of a split set or a
            folder of .gguf files). None when weights come from ``load_weights_from_tensors`` (the only way
            SFT wrappers load their weights).
        chunked_prefill_size: Largest number of tokens one forward accepts (sizes the scratch).
        cpu_save: Keep converted weights in CPU memory (quantizing methods; no effect for BF16).
        max_deferred_experts_per_token: Deferred experts per token (inference, submit_forward/sync_forward):
            each token's lowest-scored D experts run one layer late, added into the next layer's output
            (docs/SERVING.md); None or 0: none; at most num_experts_per_tok - 1.
        method: Backend method, one of INFERENCE_METHODS or SFT_METHODS (per ``mode``).
        numa_nodes: NUMA node of each sub-pool, one per sub-pool (None: node i mod the node count, and unpinned
            pools where NUMA is unavailable). A node that does not exist, or any node where NUMA is
            unavailable, is a ValueError naming numa_nodes.
        mode: "inference" or "sft".
        group_size: K-group size (32, 64, 128) of the K-group int4 methods (inference extensions
            AMXINT4_KGroup, AMXINT4_1KGroup, MOE_INT4_KGroup, MOE_INT4_1KGroup; hidden_size and
            moe_intermediate_size must be multiples of it) and of the SFT K-group methods. RAWINT4 and
            GPTQ_INT4 take the checkpoint's group size when weight_path is a native int4 checkpoint (or a
            kt convert folder of theirs), and this one otherwise.
        num_gpu_experts, lora_rank, lora_alpha, max_cache_depth, zero_point: SFT only.
        swiglu_limit: Inference with methods MXFP4 / MXFP8 only (ValueError otherwise): > 0 clamps the gate
            projection to <= swiglu_limit and the up projection to [-swiglu_limit, swiglu_limit] before the
            activation (DeepSeek-V4, gpt-oss). 0.0 (default): off.
        swiglu_alpha: Likewise: > 0 computes gate * sigmoid(swiglu_alpha * gate) * (up + 1) ("swigluoai",
            MiniMax-M3, gpt-oss) instead of silu(gate) * up. 0.0 (default): off.
        share_cache_pool: SFT only. False (default): each layer keeps its own activation caches (up to
            max_cache_depth forwards). True: all SFT wrappers of the process with the same shape,
            method and max_cache_depth share one cache pool holding max_cache_depth forwards in total,
            which is valid only when one layer's caches are alive at a time (activation
            recomputation); see ``kt_kernel.sft.amx``.

    Returns:
        A ``BaseMoEWrapper`` for inference (``NativeMoEWrapper`` for "BF16", ``AMXMoEWrapper`` for the
        AMX* methods, ``GeneralMoEWrapper`` for MOE_*), a ``kt_kernel.sft.amx.AMXSFTMoEWrapper`` for SFT.

    Raises:
        ValueError: ``mode`` is unknown, ``method`` is not a method of ``mode``, or an argument is invalid.
        NotImplementedError: an SFT argument asks for what kt lacks (num_gpu_experts > 0).
    """

    def __new__(
        cls,
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
        # Inference-specific parameters
        cpu_save: bool = False,
        max_deferred_experts_per_token: Optional[int] = None,
        # Mode and method selection
        method: str = "AMXINT4",
        numa_nodes: Optional[List[int]] = None,
        mode: str = "inference",
        # SFT-specific parameters (only used when mode="sft")
        num_gpu_experts: int = 0,
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        max_cache_depth: int = 1,
        # Quantization config (for K-Group SFT methods)
        group_size: int = 128,
        zero_point: bool = True,
        # Activation-cache storage (SFT only)
        share_cache_pool: bool = False,
        # Activation variants (inference, methods MXFP4 / MXFP8 only)
        swiglu_limit: float = 0.0,
        swiglu_alpha: float = 0.0,
    ):
        """Creates the backend for ``mode`` and ``method`` (the arguments: see the class docstring)."""
        # Validate mode
        if mode not in ("inference", "sft"):
            raise ValueError(f"Unknown mode: '{mode}'. Supported modes: 'inference', 'sft'")

        # The layer's arguments, as each mode's backend takes them.
        if mode == "inference":
            if method not in INFERENCE_METHODS and method not in KT_INFERENCE_EXTENSIONS:
                raise ValueError(
                    f"Method '{method}' not supported for inference mode. "
                    f"Supported methods: {sorted(INFERENCE_METHODS)}"
                )
            if num_gpu_experts:
                # Older clients: experts [0, num_gpu_experts) on the GPU, as a mask kt then owns.
                gpu_experts_mask = _mask_from_count(gpu_experts_mask, num_gpu_experts, num_experts)
            return _create_inference_wrapper(
                InferenceArgs(
                    layer_idx, num_experts, num_experts_per_tok, hidden_size, moe_intermediate_size,
                    gpu_experts_mask, cpuinfer_threads, threadpool_count, weight_path, chunked_prefill_size,
                    cpu_save, max_deferred_experts_per_token, method, numa_nodes, group_size,
                    swiglu_limit, swiglu_alpha,
                )
            )
        if swiglu_limit or swiglu_alpha:
            raise ValueError(
                f"swiglu_limit={swiglu_limit!r} and swiglu_alpha={swiglu_alpha!r}: SFT computes silu(gate) * up "
                "only; pass 0.0 for both"
            )
        if method not in SFT_METHODS:
            raise ValueError(
                f"Method '{method}' not supported for SFT mode. " f"Supported methods: {sorted(SFT_METHODS)}"
            )
        return _create_sft_wrapper(
            SftArgs(
                layer_idx, num_experts, num_experts_per_tok, hidden_size, moe_intermediate_size, num_gpu_experts,
                cpuinfer_threads, threadpool_count, weight_path, chunked_prefill_size, lora_rank, lora_alpha,
                max_cache_depth, method, group_size, zero_point, share_cache_pool=share_cache_pool,
            )
        )

    @staticmethod
    def set_capture_batch_sizes(capture_bs: List[int]):
        """Sets the batch sizes whose staging buffers are kept permanently (e.g. [1, 2, 4, 8, 16]).

        submit_forward/sync_forward (kt_kernel/serving.py) keep the pinned staging buffers of these sizes for
        the life of the process, so CUDA graphs captured at them keep valid addresses.
        """
        BaseMoEWrapper.set_capture_batch_sizes(capture_bs)

    @staticmethod
    def get_capture_batch_sizes() -> List[int]:
        """The batch sizes set by ``set_capture_batch_sizes``, ascending."""
        return BaseMoEWrapper.get_capture_batch_sizes()

    @staticmethod
    def clear_buffer_cache():
        """Drops all cached inference staging buffers."""
        BaseMoEWrapper.clear_buffer_cache()

    @staticmethod
    def clear_sft_buffer_cache():
        """Drops all cached SFT buffers."""
        from .sft.base import KExpertsSFTBuffer

        KExpertsSFTBuffer.clear_cache()


def _mask_from_count(gpu_experts_mask, num_gpu_experts, num_experts):
    """The mask for ``num_gpu_experts=N`` (experts [0, N) on the GPU); both arguments at once is an error."""
    if gpu_experts_mask is not None:
        raise ValueError(
            "pass either gpu_experts_mask or num_gpu_experts (the older form: experts [0, N) on the GPU), not both"
        )
    if isinstance(num_gpu_experts, bool) or not isinstance(num_gpu_experts, int):
        raise TypeError(f"num_gpu_experts must be an int, got {type(num_gpu_experts).__name__}")
    if not 0 <= num_gpu_experts <= num_experts:
        raise ValueError(f"num_gpu_experts={num_gpu_experts} must be in [0, num_experts={num_experts}]")
    mask = torch.zeros(num_experts, dtype=torch.bool)
    mask[:num_gpu_experts] = True
    return mask


def _create_inference_wrapper(args: InferenceArgs) -> BaseMoEWrapper:
    """Builds the inference backend for ``args.method`` (already checked to be in INFERENCE_METHODS)."""
    backend_cls = _INFERENCE_BACKENDS.get(args.method)
    if backend_cls is None:
        planned = _PLANNED.get(args.method, "a later issue")
        raise NotImplementedError(
            f"KTMoEWrapper: method '{args.method}' is not implemented yet in kt (planned: {planned}); "
            f"implemented inference methods: {sorted(_INFERENCE_BACKENDS)}"
        )
    return backend_cls(args)


def _create_sft_wrapper(args: SftArgs):
    """Builds the SFT backend (``kt_kernel.sft``, imported only here so inference users never load it)."""
    from .sft.amx import AMXSFTMoEWrapper

    return AMXSFTMoEWrapper(args)
