"""The arguments of one MoE layer's backend, as one bundle.

``KTMoEWrapper(...)`` takes the original kt-kernel's long signature; the backends behind it take these
dataclasses instead of repeating it. Each dataclass lists the fields in the order of the original backend
constructors, so a backend still accepts the old call (``NativeMoEWrapper(layer_idx=0, ...)`` or positional)
and turns it into the bundle (``of``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch


class _Bundle:
    @classmethod
    def of(cls, args: Tuple[Any, ...], kwargs: Dict[str, Any], **defaults: Any):
        """The bundle of a backend constructor's call: a bundle passed alone, or the fields as the original
        constructor took them (positional in field order, or keywords). ``defaults`` replace the dataclass
        defaults for fields the call leaves out (a backend's own default method)."""
        if len(args) == 1 and not kwargs and isinstance(args[0], cls):
            return args[0]
        names = [f.name for f in dataclasses.fields(cls)]
        given = set(names[: len(args)]) | set(kwargs)
        kwargs = dict(kwargs)
        for name, value in defaults.items():
            if name not in given:
                kwargs[name] = value
        return cls(*args, **kwargs)


@dataclass(frozen=True)
class InferenceArgs(_Bundle):
    """An inference backend's arguments (see ``KTMoEWrapper`` for each one's meaning)."""

    layer_idx: int
    num_experts: int
    num_experts_per_tok: int
    hidden_size: int
    moe_intermediate_size: int
    gpu_experts_mask: Optional[torch.Tensor]
    cpuinfer_threads: int
    threadpool_count: int
    weight_path: Any
    chunked_prefill_size: int
    cpu_save: bool = False
    max_deferred_experts_per_token: Optional[int] = None
    method: str = "AMXINT4"
    numa_nodes: Optional[List[int]] = None
    group_size: int = 128
    swiglu_limit: float = 0.0
    swiglu_alpha: float = 0.0


@dataclass(frozen=True)
class SftArgs(_Bundle):
    """An SFT backend's arguments (see ``KTMoEWrapper`` and ``kt_kernel.sft.amx``)."""

    layer_idx: int
    num_experts: int
    num_experts_per_tok: int
    hidden_size: int
    moe_intermediate_size: int
    num_gpu_experts: int
    cpuinfer_threads: int
    threadpool_count: int
    weight_path: Any
    chunked_prefill_size: int
    lora_rank: int = 16
    lora_alpha: float = 32.0
    max_cache_depth: int = 1
    method: str = "AMXBF16_SFT"
    group_size: int = 128
    zero_point: bool = True
    share_backward_bb: bool = False
    share_cache_pool: bool = False
