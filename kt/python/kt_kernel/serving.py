"""The asynchronous forward a serving engine uses: ``submit_forward`` / ``sync_forward`` ordered on a CUDA stream.

The flow per layer and step (SGLang's hybrid MoE path, as it calls the original kt-kernel):

1. ``submit_forward(x, topk_ids, topk_weights, cuda_stream)``: on ``cuda_stream``, x (bf16 ``[T, H]``), the ids
   (int32 or int64, -1 for padding) and the weights (fp32) are copied into pinned host buffers and the batch
   size into a pinned int32, then a host callback queues the layer's forward on kt's task queue. The call
   returns at once; the GPU goes on with its own experts.
2. ``sync_forward(x, cuda_stream)``: a host callback on the stream waits for the CPU result, then the result is
   copied into a persistent CUDA buffer of that batch size, which is returned (the caller adds it to its own
   output after the stream's work).

Everything is ordered by the stream and nothing depends on Python-side values at execution time, so the
sequence can be captured in a CUDA graph and replayed: the forward reads the batch size through its pointer.
Without a stream (CPU tensors, or ``cuda_stream=None``) the same tasks run on the queue and ``sync_forward``
waits on the host.

Buffers (``StagingBuffers``) are per (batch size, layer parity) and shared by all layers: layer L uses parity
L % 2, so layer L+1 can stage its input while L's deferred experts still run. Batch sizes listed by
``set_capture_batch_sizes`` keep their buffers (stable addresses for graphs); other sizes share one
temporary set per parity, regrown when a larger batch comes (after waiting for what uses it).

Deferred experts (``max_deferred_experts_per_token = D``): layer L's task runs the experts protected by some
token's top k - D and leaves the rest to a second task queued right after it, which writes into the output
buffer of parity (L + 1) % 2; layer L + 1's forward adds its result onto it. So a deferred expert's
contribution reaches the model one layer late, as in the original. ``sync_forward`` of a layer with deferred
experts lets that second task run on (``allow_n_pending = 1``).
"""

from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple

import torch

from . import _native

_queue_lock = threading.Lock()
_queue = None


def task_queue():
    """The process's one task queue (one dedicated thread; tasks run in submission order)."""
    global _queue
    with _queue_lock:
        if _queue is None:
            _queue = _native._kt.TaskQueue()
        return _queue


def _pinned(shape, dtype, pin: bool) -> torch.Tensor:
    t = torch.zeros(shape, dtype=dtype)
    return t.pin_memory() if pin else t


class StagingBuffers:
    """Pinned host buffers of up to ``capacity`` rows (and a CUDA output buffer when ``device`` is CUDA)."""

    def __init__(self, capacity: int, hidden: int, k: int, device: Optional[torch.device]):
        pin = device is not None and device.type == "cuda"
        self.capacity, self.hidden, self.k, self.device = capacity, hidden, k, device
        self.input = _pinned((capacity, hidden), torch.bfloat16, pin)
        self.ids = _pinned((capacity, k), torch.int32, pin)
        self.weights = _pinned((capacity, k), torch.float32, pin)
        self.output = _pinned((capacity, hidden), torch.bfloat16, pin)
        self.deferred_ids = _pinned((capacity, k), torch.int64, pin)
        self.deferred_ids.fill_(-1)
        self.batch_size = _pinned((1,), torch.int32, pin)
        # Stream-ordered inputs are staged with copies only (the copy engines), never a kernel: a kernel on the
        # side stream would queue behind the GPU work the client launches on its main stream right after
        # submit_forward, delaying the CPU experts until that work is nearly done. So int64 ids get their own
        # pinned buffer (no int32 conversion kernel), and the batch size is copied from a device table of
        # 0..capacity (no fill kernel); a captured graph replays the same copy.
        self.ids64 = _pinned((capacity, k), torch.int64, pin) if pin else None
        self.device_counts = torch.arange(capacity + 1, dtype=torch.int32, device=device) if pin else None
        self.device_output = torch.zeros((capacity, hidden), dtype=torch.bfloat16, device=device) if pin else None
        # Set when a layer's deferred task was queued to write into `output`; the next layer's forward on this
        # buffer then adds onto it instead of overwriting it.
        self.holds_deferred = False


class _BufferCache:
    """Staging buffers shared by all wrappers: kept per captured batch size, else one temporary set."""

    lock = threading.Lock()
    capture_sizes: Tuple[int, ...] = ()
    kept: Dict[tuple, StagingBuffers] = {}
    temporary: Dict[tuple, StagingBuffers] = {}
    generation = 0  # bumped when buffers are dropped: wrappers rebuild their tasks

    @classmethod
    def get(cls, rows: int, parity: int, hidden: int, k: int, device) -> StagingBuffers:
        dev_key = None if device is None else str(device)
        with cls.lock:
            if rows in cls.capture_sizes:
                key = (rows, parity, hidden, k, dev_key)
                buf = cls.kept.get(key)
                if buf is None:
                    buf = cls.kept[key] = StagingBuffers(rows, hidden, k, device)
                return buf
            key = (parity, hidden, k, dev_key)
            buf = cls.temporary.get(key)
            if buf is None or buf.capacity < rows:
                if buf is not None:
                    # Something queued earlier may still read or write the old buffers.
                    task_queue().sync()
                    if device is not None and device.type == "cuda":
                        torch.cuda.synchronize(device)
                    cls.generation += 1
                buf = cls.temporary[key] = StagingBuffers(rows, hidden, k, device)
            return buf

    @classmethod
    def clear(cls) -> None:
        with cls.lock:
            cls.kept.clear()
            cls.temporary.clear()
            cls.generation += 1


class ServingPath:
    """submit_forward / sync_forward of one wrapper (see the module docstring)."""

    def __init__(self, wrapper):
        self.w = wrapper
        self._tasks: Dict[tuple, object] = {}
        self._generation = -1
        self._submitted: Optional[Tuple[StagingBuffers, int, bool]] = None  # (buffers, rows, deferred)

    # -- tasks -----------------------------------------------------------------------------------------

    def _task(self, buf: StagingBuffers, kind: str):
        """The ServingForward of this layer over `buf`: "now", "now+" (adds onto the output) or "later"; "now"
        and "now+" with a "64" suffix read the int64 ids buffer."""
        if self._generation != _BufferCache.generation:
            self._tasks.clear()
            self._generation = _BufferCache.generation
        pool = self.w._pool()
        key = (id(buf), kind, id(pool))
        task = self._tasks.get(key)
        if task is not None:
            return task
        w = self.w
        mask = w._checked_mask()
        deferred = kind != "later" and bool(w.max_deferred_experts_per_token)
        if kind == "later":
            # Reads this parity's rows and deferred ids; writes the next parity's output.
            nxt = _BufferCache.get(buf.capacity, 1 - self._parity(), buf.hidden, buf.k, buf.device)
            ids, ids_int32, output, accumulate = buf.deferred_ids, False, nxt.output, False
        else:
            int64 = kind.endswith("64")
            ids, ids_int32 = (buf.ids64, False) if int64 else (buf.ids, True)
            output, accumulate = buf.output, kind.startswith("now+")
        task = _native._kt.ServingForward(
            layer=w._moe.address,
            pool=pool,
            batch_size=buf.batch_size.data_ptr(),
            capacity=buf.capacity,
            k=buf.k,
            ids=ids.data_ptr(),
            ids_int32=ids_int32,
            weights=buf.weights.data_ptr(),
            input=buf.input.data_ptr(),
            output=output.data_ptr(),
            gpu_experts_mask=0 if mask is None else mask.data_ptr(),
            accumulate=accumulate,
            max_deferred=int(w.max_deferred_experts_per_token or 0) if deferred else 0,
            deferred_ids=buf.deferred_ids.data_ptr() if deferred else 0,
            chunk=w.chunked_prefill_size,
        )
        # The task holds raw addresses: keep what they point into alive with it.
        task._kt_keep = (buf, output, mask, w._moe)
        self._tasks[key] = task
        return task

    def _parity(self) -> int:
        return self.w.layer_idx % 2

    # -- the API ---------------------------------------------------------------------------------------

    def submit(self, hidden_states, topk_ids, topk_weights, cuda_stream) -> None:
        w = self.w
        queue = task_queue()
        queue.poll_error()  # an error of an earlier stream-ordered step surfaces here
        rows = _check_inputs(w, hidden_states, topk_ids, topk_weights)
        on_gpu = hidden_states.is_cuda
        if cuda_stream is not None and not on_gpu:
            raise ValueError("cuda_stream was given but hidden_states is on the CPU; pass CUDA tensors or "
                             "cuda_stream=None")
        if on_gpu and cuda_stream is None:
            raise ValueError("hidden_states is on the GPU: pass the cuda_stream the copies and the CPU work "
                             "are ordered on (torch.cuda.current_stream().cuda_stream)")
        buf = _BufferCache.get(rows, self._parity(), w.hidden_size, w.num_experts_per_tok,
                               hidden_states.device if on_gpu else None)
        k = topk_ids.shape[1]
        ids64 = on_gpu and topk_ids.dtype == torch.int64
        if on_gpu:
            stream = torch.cuda.ExternalStream(int(cuda_stream), device=hidden_states.device)
            with torch.cuda.stream(stream):
                buf.input[:rows].copy_(hidden_states, non_blocking=True)
                if ids64:
                    buf.ids64[:rows, :k].copy_(topk_ids, non_blocking=True)
                else:
                    buf.ids[:rows, :k].copy_(topk_ids.to(torch.int32), non_blocking=True)
                buf.weights[:rows, :k].copy_(topk_weights.to(torch.float32), non_blocking=True)
                buf.batch_size.copy_(buf.device_counts[rows:rows + 1], non_blocking=True)
        else:
            buf.input[:rows].copy_(hidden_states)
            buf.ids[:rows, :k].copy_(topk_ids)
            buf.weights[:rows, :k].copy_(topk_weights)
            buf.batch_size[0] = rows
        if k < buf.k:
            (buf.ids64 if ids64 else buf.ids)[:rows, k:].fill_(-1)
        deferred = bool(w.max_deferred_experts_per_token)
        now = self._task(buf, ("now+" if buf.holds_deferred else "now") + ("64" if ids64 else ""))
        buf.holds_deferred = False
        if on_gpu:
            queue.submit_with_cuda_stream(int(cuda_stream), now)
        else:
            queue.submit(now)
        if deferred:
            later = self._task(buf, "later")
            if on_gpu:
                queue.submit_with_cuda_stream(int(cuda_stream), later)
            else:
                queue.submit(later)
            _BufferCache.get(buf.capacity, 1 - self._parity(), buf.hidden, buf.k, buf.device).holds_deferred = True
        self._submitted = (buf, rows, deferred)

    def sync(self, hidden_states, cuda_stream) -> torch.Tensor:
        if self._submitted is None:
            raise RuntimeError(f"sync_forward of layer {self.w.layer_idx} without a submit_forward before it")
        buf, rows, deferred = self._submitted
        self._submitted = None
        queue = task_queue()
        allow = 1 if deferred else 0
        if buf.device_output is not None:
            if cuda_stream is None:
                raise ValueError("submit_forward was ordered on a CUDA stream: pass the same cuda_stream here")
            queue.sync_with_cuda_stream(int(cuda_stream), allow)
            stream = torch.cuda.ExternalStream(int(cuda_stream), device=buf.device)
            with torch.cuda.stream(stream):
                buf.device_output[:rows].copy_(buf.output[:rows], non_blocking=True)
            queue.poll_error()
            return buf.device_output[:rows]
        queue.sync(allow)
        return buf.output[:rows].clone()


def _check_inputs(w, hidden_states, topk_ids, topk_weights) -> int:
    for name, t in (("hidden_states", hidden_states), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden_states.dim() != 2 or hidden_states.shape[1] != w.hidden_size:
        raise ValueError(f"hidden_states must have shape [T, hidden_size={w.hidden_size}], "
                         f"got {list(hidden_states.shape)}")
    if hidden_states.dtype != torch.bfloat16:
        raise TypeError(f"hidden_states must be bfloat16, got {hidden_states.dtype}")
    rows = hidden_states.shape[0]
    if rows < 1:
        raise ValueError("hidden_states has no rows")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != rows or not 1 <= topk_ids.shape[1] <= w.num_experts_per_tok:
        raise ValueError(f"topk_ids must have shape [T={rows}, k <= num_experts_per_tok="
                         f"{w.num_experts_per_tok}], got {list(topk_ids.shape)}")
    if not topk_weights.is_floating_point() or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights must be a float tensor of topk_ids' shape {list(topk_ids.shape)}, got "
                         f"{topk_weights.dtype} {list(topk_weights.shape)}")
    devices = {t.device for t in (hidden_states, topk_ids, topk_weights)}
    if len(devices) != 1:
        raise ValueError(f"hidden_states, topk_ids and topk_weights must be on one device, got {sorted(map(str, devices))}")
    return rows


# -- GPU prefill of CPU experts: one expert written into per-GPU-rank host buffers ----------------------------

# Weight formats whose GPU kernel layout kt writes (kt/moe/gpu_expert_buffers.h), and whether they have scales.
_GPU_LAYOUT_SCALES = {"bf16": False, "fp8_block": True, "int4_group_sym": True}


def _check_ptr_list(name: str, ptrs, tp: int):
    if isinstance(ptrs, (str, bytes)) or not hasattr(ptrs, "__len__"):
        raise TypeError(f"{name} must be a list of ints (buffer addresses, e.g. tensor.data_ptr()), one per GPU "
                        f"TP rank; got {type(ptrs).__name__}")
    ptrs = list(ptrs)
    if len(ptrs) != tp:
        raise ValueError(f"{name} has {len(ptrs)} addresses; expected one per GPU TP rank "
                         f"(tp_world_size={tp})")
    out = []
    for r, p in enumerate(ptrs):
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"{name}[{r}] must be an int address (tensor.data_ptr()), got {type(p).__name__}")
        if p <= 0:
            raise ValueError(f"{name}[{r}] = {p} is not a valid address; every rank's buffer must be given")
        out.append(p)
    return out


def submit_write_weight_scale_to_buffer(w, tp_world_size, expert_id, w13_weight_ptrs, w13_scale_ptrs,
                                        w2_weight_ptrs, w2_scale_ptrs) -> None:
    """Queues the write of expert ``expert_id`` into the buffers (see BaseMoEWrapper's method)."""
    method_name = "submit_write_weight_scale_to_buffer"
    fmt = getattr(w, "weight_format", None)
    # FP8_PERCHANNEL is held as fp8_block with a scale per row, which the GPU's 128 x 128 block layout cannot
    # carry: refused rather than written with one row's scale for its whole block.
    if fmt not in _GPU_LAYOUT_SCALES or w.method == "FP8_PERCHANNEL":
        raise NotImplementedError(
            f"{type(w).__name__} (method {w.method!r}): {method_name} is not implemented for this method's weights "
            f"({fmt}): kt writes the GPU kernel layout of BF16, FP8 (block 128) and RAWINT4 experts only")
    if fmt == "int4_group_sym" and w.method != "RAWINT4":
        raise NotImplementedError(
            f"{type(w).__name__} (method {w.method!r}): {method_name}: kt writes int4 in compressed-tensors' "
            "pack-quantized GPU layout (bf16 scales) for method RAWINT4 only")
    if getattr(w, "tensor_parallel", False):
        raise NotImplementedError(
            f"{type(w).__name__} (layer {w.layer_idx}): {method_name} reads one whole layer; this wrapper's experts "
            f"are split into threadpool_count={w.threadpool_count} tensor-parallel parts (NUMA sub-pools). Use "
            "threadpool_count=1 for a layer whose experts the GPU prefill reads")
    if not w.weights_loaded:
        raise RuntimeError(f"{type(w).__name__} (layer {w.layer_idx}): {method_name} before the expert weights "
                           "were loaded; call load_weights or load_weights_from_tensors first")
    if isinstance(tp_world_size, bool) or not isinstance(tp_world_size, int):
        raise TypeError(f"tp_world_size must be an int, got {type(tp_world_size).__name__}")
    I = w.moe_intermediate_size
    if tp_world_size < 1 or I % tp_world_size:
        raise ValueError(f"tp_world_size={tp_world_size} must be >= 1 and divide moe_intermediate_size={I} "
                         "(each GPU rank holds I / tp_world_size rows of gate and up)")
    if fmt == "fp8_block" and tp_world_size > 1 and (I // tp_world_size) % 128:
        raise ValueError(f"tp_world_size={tp_world_size}: each rank's share of moe_intermediate_size={I} is "
                         f"{I // tp_world_size}, not a multiple of the FP8 scale block (128)")
    if fmt == "int4_group_sym" and (I // tp_world_size) % w.group_size:
        raise ValueError(f"tp_world_size={tp_world_size}: each rank's share of moe_intermediate_size={I} is "
                         f"{I // tp_world_size}, not a multiple of the int4 group size ({w.group_size})")
    if isinstance(expert_id, bool) or not isinstance(expert_id, int):
        raise TypeError(f"expert_id must be an int, got {type(expert_id).__name__}")
    if not 0 <= expert_id < w.num_experts:
        raise ValueError(f"expert_id={expert_id} is not in [0, num_experts={w.num_experts}) (a physical expert "
                         "slot: the index of the GPU layer's expert arrays)")
    w13w = _check_ptr_list("w13_weight_ptrs", w13_weight_ptrs, tp_world_size)
    w2w = _check_ptr_list("w2_weight_ptrs", w2_weight_ptrs, tp_world_size)
    if _GPU_LAYOUT_SCALES[fmt]:
        w13s = _check_ptr_list("w13_scale_ptrs", w13_scale_ptrs, tp_world_size)
        w2s = _check_ptr_list("w2_scale_ptrs", w2_scale_ptrs, tp_world_size)
    else:
        # BF16 has no scales: the lists are ignored (SGLang passes [0] * tp_world_size), as in the original.
        w13s, w2s = [], []
    pool = w._pool()
    task = _native._kt.GpuExpertWrite(w._moe.address, pool, tp_world_size, expert_id, w13w, w13s, w2w, w2s)
    task._kt_keep = (w._moe, pool)  # the task holds their addresses
    pending = w.__dict__.setdefault("_gpu_buffer_writes", [])
    pending.append(task)  # the queue keeps only the task's address: alive until the sync
    task_queue().submit(task)


def sync_write_weight_scale_to_buffer(w) -> None:
    """Waits for the queue (every write submitted so far); raises the error of a failed task."""
    try:
        task_queue().sync()
    finally:
        w.__dict__["_gpu_buffer_writes"] = []
