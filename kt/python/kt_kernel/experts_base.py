"""Backend-independent parts of the inference wrappers: configuration checks, the expert mask, buffer
bookkeeping and the methods every backend has.

A backend (see ``kt_kernel.utils.native.NativeMoEWrapper``) implements ``load_weights_from_tensors`` and
``forward``; what it does not implement raises NotImplementedError naming the method.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch

from . import _native
from ._args import InferenceArgs
from ._checks import check_int, check_moe_shape, check_tensor


class KExpertsCPUBuffer:
    """The per-batch-size staging buffers of submit_forward/sync_forward, shared by all layers of the process.

    Pinned CPU tensors (input, ids, weights, output, the batch size) and a CUDA output buffer per batch size
    and layer parity (``kt_kernel.serving.StagingBuffers``). Batch sizes registered with
    ``set_capture_batch_sizes`` keep their buffers for the life of the process (stable addresses for CUDA-graph
    capture); any other size shares one temporary set per parity. This class is the original's name for that
    cache; the cache itself is ``kt_kernel.serving._BufferCache``.
    """

    @classmethod
    def set_capture_batch_sizes(cls, capture_bs: List[int]) -> None:
        from .serving import _BufferCache

        sizes = [check_int(f"capture_bs[{i}]", bs, minimum=1) for i, bs in enumerate(capture_bs)]
        with _BufferCache.lock:
            _BufferCache.capture_sizes = tuple(sorted(set(sizes)))

    @classmethod
    def get_capture_batch_sizes(cls) -> List[int]:
        from .serving import _BufferCache

        with _BufferCache.lock:
            return list(_BufferCache.capture_sizes)

    @classmethod
    def clear_buffer_cache(cls) -> None:
        from .serving import _BufferCache

        _BufferCache.clear()


class BaseMoEWrapper:
    """The routed experts of one MoE layer, computed on the CPU.

    Created through ``kt_kernel.KTMoEWrapper`` (see there for the arguments). Subclasses implement the
    weight loading and forward of one family of methods.

    Threads: with ``threadpool_count=1`` and no ``numa_nodes``, all wrappers share one process-wide worker
    pool sized by the largest ``cpuinfer_threads`` asked for so far (see ``kt_kernel._native``). With
    ``threadpool_count=N > 1`` (or explicit ``numa_nodes``) the layer is split N ways along
    moe_intermediate_size (tensor parallelism): part i runs on its own sub-pool of cpuinfer_threads / N
    threads pinned to NUMA node ``numa_nodes[i]`` (default: node i mod the node count) with its weights bound
    to that node, and the parts' fp32 results are summed (docs/SERVING.md, NUMA).
    """

    def __init__(self, *args, **kwargs):
        """Takes an ``InferenceArgs`` (``kt_kernel._args``), or its fields as the original constructor did."""
        a = InferenceArgs.of(args, kwargs)
        self.args = a
        shape = check_moe_shape(
            a.layer_idx, a.num_experts, a.num_experts_per_tok, a.hidden_size, a.moe_intermediate_size
        )
        self.layer_idx, self.num_experts, self.num_experts_per_tok, self.hidden_size, self.moe_intermediate_size = shape
        self.cpuinfer_threads = check_int("cpuinfer_threads", a.cpuinfer_threads, minimum=1)
        self.threadpool_count = check_int("threadpool_count", a.threadpool_count, minimum=1)
        self.chunked_prefill_size = check_int("chunked_prefill_size", a.chunked_prefill_size, minimum=1)
        if a.weight_path is not None and not isinstance(a.weight_path, (str, os.PathLike)):
            raise TypeError(
                f"weight_path must be a str, an os.PathLike (e.g. pathlib.Path) or None, got "
                f"{type(a.weight_path).__name__}"
            )
        self.weight_path = None if a.weight_path is None else os.fspath(a.weight_path)
        if isinstance(self.weight_path, bytes):
            raise TypeError("weight_path must be a text path, got bytes")
        self.cpu_save = bool(a.cpu_save)
        self.method = a.method
        numa_nodes = a.numa_nodes
        if numa_nodes is not None:
            numa_nodes = [check_int(f"numa_nodes[{i}]", n, minimum=0) for i, n in enumerate(numa_nodes)]
            if len(numa_nodes) != a.threadpool_count:
                raise ValueError(
                    f"numa_nodes must list one node per sub-pool (threadpool_count={a.threadpool_count}), "
                    f"got {len(numa_nodes)}: {numa_nodes}"
                )
        self.numa_nodes = numa_nodes
        if a.max_deferred_experts_per_token:
            # Deferred experts (kt_kernel/serving.py): the lowest-weighted experts of each token run one layer
            # late, through submit_forward/sync_forward; at least one expert per token runs now.
            check_int("max_deferred_experts_per_token", a.max_deferred_experts_per_token, minimum=0)
            if a.max_deferred_experts_per_token >= self.num_experts_per_tok:
                raise ValueError(
                    f"max_deferred_experts_per_token={a.max_deferred_experts_per_token} must be smaller than "
                    f"num_experts_per_tok={self.num_experts_per_tok}: each token keeps one expert in its own layer"
                )
        self.max_deferred_experts_per_token = a.max_deferred_experts_per_token

        # Read by C++ at every forward (so flipping bits later takes effect): this very tensor is kept, and
        # checked again at every forward (see _checked_mask).
        self.gpu_experts_mask = a.gpu_experts_mask

        # NUMA sub-pools (tensor parallelism) when asked for; else the one process-wide pool.
        self.tensor_parallel = self.threadpool_count > 1 or numa_nodes is not None
        if not self.tensor_parallel:
            _native.get_thread_pool(a.cpuinfer_threads)

    # -- the GPU expert mask ----------------------------------------------------------------------------

    @property
    def gpu_experts_mask(self) -> Optional[torch.Tensor]:
        """bool CPU tensor [num_experts] (True: the expert runs on the GPU, the CPU result skips it) or None.

        The tensor itself is kept, so flipping its bits in place takes effect at the next forward. Assigning
        checks the new value; every forward checks it again (dtype bool, shape [num_experts], CPU,
        contiguous), since the tensor may have been resized in place since.
        """
        return self._gpu_experts_mask

    @gpu_experts_mask.setter
    def gpu_experts_mask(self, mask: Optional[torch.Tensor]) -> None:
        if mask is not None:
            check_tensor("gpu_experts_mask", mask, torch.bool, (self.num_experts,), "[num_experts]")
        self._gpu_experts_mask = mask

    def _checked_mask(self) -> Optional[torch.Tensor]:
        """The mask as a forward reads it, checked now: C++ reads num_experts bools from its address."""
        mask = self._gpu_experts_mask
        if mask is not None:
            check_tensor("gpu_experts_mask", mask, torch.bool, (self.num_experts,), "[num_experts]")
        return mask

    # -- buffer cache (class-wide) --------------------------------------------------------------------

    @staticmethod
    def set_capture_batch_sizes(capture_bs: List[int]) -> None:
        """Sets the batch sizes whose staging buffers are kept permanently (see KExpertsCPUBuffer)."""
        KExpertsCPUBuffer.set_capture_batch_sizes(capture_bs)

    @staticmethod
    def get_capture_batch_sizes() -> List[int]:
        """The batch sizes set by set_capture_batch_sizes, ascending."""
        return KExpertsCPUBuffer.get_capture_batch_sizes()

    @staticmethod
    def clear_buffer_cache() -> None:
        """Drops every cached staging buffer."""
        KExpertsCPUBuffer.clear_buffer_cache()

    # -- helpers for subclasses -----------------------------------------------------------------------

    @staticmethod
    def _pool():
        """The process-wide worker pool (looked up per call: a larger wrapper may have replaced it)."""
        return _native.current_thread_pool()

    def _not_implemented(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"{type(self).__name__} (method {self.method!r}): {what} is not implemented yet in kt"
        )

    # -- the backend API ------------------------------------------------------------------------------

    def load_weights(self, physical_to_logical_map_cpu: Optional[torch.Tensor] = None) -> None:
        """Loads the experts from ``weight_path``: implemented by the backends (``NativeMoEWrapper`` and its
        subclasses, kt_kernel/utils/native.py); a backend without it raises NotImplementedError."""
        raise self._not_implemented(
            "load_weights (reading weights from weight_path; weight file IO comes later — use "
            "load_weights_from_tensors)"
        )

    def load_weights_from_tensors(
        self,
        gate_proj: torch.Tensor,
        up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        physical_to_logical_map_cpu: Optional[torch.Tensor] = None,
    ) -> None:
        """Loads the experts from in-memory tensors (gate/up [E, I, H], down [E, H, I])."""
        raise self._not_implemented("load_weights_from_tensors")

    def forward(
        self,
        hidden_states: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        cuda_stream=None,
    ) -> torch.Tensor:
        """Routed experts' weighted sum for a batch of tokens (synchronous)."""
        raise self._not_implemented("forward")

    def submit_forward(self, hidden_states, topk_ids, topk_weights, cuda_stream=None) -> None:
        """Queues this layer's forward (kt_kernel/serving.py): with CUDA tensors, ordered on ``cuda_stream``
        (an int, ``torch.cuda.Stream.cuda_stream``) and capturable in a CUDA graph; with CPU tensors and
        ``cuda_stream=None``, on kt's task queue. ``topk_ids`` int32 or int64, -1 for padding; batches longer
        than ``chunked_prefill_size`` run in chunks. Returns at once; ``sync_forward`` gives the result."""
        if not self.weights_loaded:
            raise RuntimeError(
                f"{type(self).__name__} (layer {self.layer_idx}): submit_forward before the expert weights were "
                "loaded; call load_weights or load_weights_from_tensors first"
            )
        self._serving_path().submit(hidden_states, topk_ids, topk_weights, cuda_stream)

    def sync_forward(self, hidden_states, cuda_stream=None) -> torch.Tensor:
        """Waits for this layer's submit_forward and returns its result: a persistent CUDA bf16 buffer of
        the batch size when it was submitted on a stream (valid until this batch size's next forward of the
        same layer parity), else a new CPU tensor. Raises the error of a failed task."""
        return self._serving_path().sync(hidden_states, cuda_stream)

    def submit_write_weight_scale_to_buffer(self, tp_world_size, expert_id, w13_weight_ptrs, w13_scale_ptrs,
                                            w2_weight_ptrs, w2_scale_ptrs) -> None:
        """Queues the write of one expert's weights (and scales) into host buffers in the GPU MoE kernel's
        layout, one buffer per GPU tensor-parallel rank (SGLang's GPU prefill of CPU experts, the original's
        method of the same name); ``sync_write_weight_scale_to_buffer`` waits for it.

        ``expert_id``: a physical expert slot (slot i holds logical expert ``physical_to_logical_map[i]`` of the
        load; the index of the GPU layer's expert arrays). The ``*_ptrs`` are lists of ``tp_world_size`` int
        addresses (e.g. pinned tensors' ``data_ptr()``), each at this expert's place in rank r's buffer. With
        n = moe_intermediate_size / tp_world_size, rank r gets

        - ``w13_weight``: gate rows [r n, (r+1) n) as [n, H], then up's same rows as [n, H];
        - ``w2_weight``: down's columns [r n, (r+1) n) as [H, n];

        bf16 for ``BF16``, float8_e4m3fn bytes for ``FP8``. ``FP8`` adds the fp32 ``weight_scale_inv`` blocks:
        ``w13_scale`` gate's block rows [r n/128, (r+1) n/128) as [n/128, ceil(H/128)], then up's; ``w2_scale``
        down's block columns as [ceil(H/128), n/128] (tp_world_size > 1 needs n % 128 == 0). ``BF16`` ignores
        the scale lists. ``RAWINT4`` writes compressed-tensors' pack-quantized layout with G the group size:
        ``w13_weight`` / ``w2_weight`` as above in offset-binary int4 (q + 8, element 2i in the low nibble of
        byte i: int32 ``weight_packed`` words), H/2 (n/2) bytes per row; ``w13_scale`` gate's then up's rows
        as [n, H/G] bf16, ``w2_scale`` down's groups of the rank's columns as [H, n/G] bf16 (n % G == 0).
        The values are the stored ones, bit for bit. Other methods: NotImplementedError.

        Raises (at submit, writing nothing): NotImplementedError (method), RuntimeError (weights not loaded),
        TypeError/ValueError (tp_world_size not dividing the intermediate size, expert_id out of range, a list
        not of tp_world_size non-zero ints).
        """
        from .serving import submit_write_weight_scale_to_buffer

        submit_write_weight_scale_to_buffer(self, tp_world_size, expert_id, w13_weight_ptrs, w13_scale_ptrs,
                                            w2_weight_ptrs, w2_scale_ptrs)

    def sync_write_weight_scale_to_buffer(self) -> None:
        """Waits until the submitted writes have run (the process's task queue); raises a failed one's error."""
        from .serving import sync_write_weight_scale_to_buffer

        sync_write_weight_scale_to_buffer(self)

    def _serving_path(self):
        path = getattr(self, "_serving", None)
        if path is None:
            from .serving import ServingPath

            path = self._serving = ServingPath(self)
        return path

    def select_deferred_experts(self, *args, **kwargs):
        """Deferred-experts selection. Not implemented yet."""
        raise self._not_implemented("select_deferred_experts (deferred experts)")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layer_idx={self.layer_idx}, method={self.method!r}, "
            f"num_experts={self.num_experts}, num_experts_per_tok={self.num_experts_per_tok}, "
            f"hidden_size={self.hidden_size}, moe_intermediate_size={self.moe_intermediate_size}, "
            f"chunked_prefill_size={self.chunked_prefill_size})"
        )
