"""Rank-0-only experts: under ``torch.distributed`` only rank 0 holds a layer's experts in kt.

Every rank runs the same model on its own tokens. At each MoE layer the ranks' tokens (variable counts) are
gathered to rank 0, which runs kt's forward over all of them at once and scatters each rank's rows back; the
backward gathers the output gradients the same way, rank 0 runs kt's backward, scatters grad_input and the
router-weight gradients, and broadcasts the LoRA gradients. So one copy of the expert weights serves the
node, however many training processes share it.

LoRA gradients: rank 0's backward over every rank's rows gives the sum over ranks of each rank's gradient;
scaled by 1 / world_size it is the average that DistributedDataParallel would have formed. Every rank gets
that same gradient for its (identical) LoRA parameters, so a DDP all-reduce of them changes nothing and
every rank's optimizer takes the same step. Without DDP (FSDP2 with the expert modules left out of sharding,
or a hand-written loop) the gradient is already the average.

Collectives run on the CPU for gloo (and other CPU backends) and on the current CUDA device for NCCL. Every
call is a collective: all ranks must run the same MoE layers in the same order with gradients enabled alike,
which the same model and the same training loop do.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist


def distributed_world() -> Tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Rank0Backend:
    """Stands for a layer's kt backend on every rank: forwards and backwards are collectives served by the
    real backend on rank 0 (``backend``; None on the other ranks).

    ``info`` holds what the layer wrapper reads of a backend without calling it (method, lora_alpha,
    max_cache_depth, skip_lora, the layer's shape); on rank 0 the real backend's values win, except
    ``chunked_prefill_size``, which stays the most rows one rank may pass (rank 0's backend takes
    world_size times as many).
    """

    def __init__(self, backend, info: dict):
        self.rank, self.world = distributed_world()
        if self.world < 2:
            raise ValueError("Rank0Backend: torch.distributed has one process; use the backend itself")
        if (self.rank == 0) != (backend is not None):
            raise ValueError("Rank0Backend: rank 0 and only rank 0 holds the kt backend")
        self.backend = backend
        self._info = dict(info)
        self._lora_ptrs: Tuple[int, ...] = ()
        self._grad_buffers: Tuple[torch.Tensor, ...] = ()
        # Per forward kept for a backward (LIFO, as kt's cache stack): every rank's row count, and k.
        self._pending: List[Tuple[List[int], int]] = []
        # The most rows one rank may pass (rank 0's backend takes world_size times as many).
        self.chunked_prefill_size = int(info["chunked_prefill_size"])
        nccl = dist.get_backend() == "nccl"
        self._device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def __getattr__(self, name):
        # Only reached for names not set in __init__: the backend's own on rank 0, else the recorded info.
        if name.startswith("__"):
            raise AttributeError(name)
        backend = self.__dict__.get("backend")
        if backend is not None:
            return getattr(backend, name)
        info = self.__dict__.get("_info", {})
        if name in info:
            return info[name]
        raise AttributeError(f"{name!r}: only rank 0 holds the kt backend (rank-0-only experts)")

    # -- LoRA ------------------------------------------------------------------------------------------

    def init_lora_weights(self, *tensors) -> None:
        """The six LoRA parameters then their six gradient buffers, as the backend takes them."""
        self._lora_ptrs = tuple(t.data_ptr() for t in tensors)
        self._grad_buffers = tuple(tensors[6:])
        if self.backend is not None:
            self.backend.init_lora_weights(*tensors)
            self._lora_ptrs = self.backend._lora_ptrs

    # -- collectives -----------------------------------------------------------------------------------

    def _counts(self, rows: int) -> List[int]:
        mine = torch.tensor([rows], dtype=torch.int64, device=self._device)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        return [int(c) for c in every]

    def _gather(self, t: torch.Tensor, counts: List[int]) -> Optional[torch.Tensor]:
        """Rank 0: every rank's rows of ``t`` concatenated in rank order; other ranks: None."""
        most = max(counts)
        padded = torch.zeros((most,) + tuple(t.shape[1:]), dtype=t.dtype, device=self._device)
        padded[: t.shape[0]].copy_(t)
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(padded, parts, dst=0)
        if self.rank != 0:
            return None
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()

    def _scatter(self, full: Optional[torch.Tensor], counts: List[int], like: torch.Tensor) -> torch.Tensor:
        """Each rank's rows of rank 0's ``full`` (rank order, ``counts`` rows each)."""
        most = max(counts)
        out = torch.empty((most,) + tuple(like.shape[1:]), dtype=like.dtype, device=self._device)
        parts = None
        if self.rank == 0:
            parts, start = [], 0
            for c in counts:
                p = torch.zeros_like(out)
                p[:c].copy_(full[start:start + c])
                parts.append(p)
                start += c
        dist.scatter(out, parts, src=0)
        return out[: counts[self.rank]].cpu()

    def _from_rank0(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self._device)
        dist.broadcast(t, src=0)
        return int(t)

    # -- the backend's calls ---------------------------------------------------------------------------

    @property
    def cache_depth(self) -> int:
        return self._from_rank0(self.backend.cache_depth if self.backend is not None else 0)

    def forward(self, x, ids, w, save_for_backward: bool = False) -> torch.Tensor:
        counts = self._counts(x.shape[0])
        xs, ids_all, ws = self._gather(x, counts), self._gather(ids, counts), self._gather(w, counts)
        out = None
        if self.rank == 0:
            out = self.backend.forward(xs, ids_all, ws, save_for_backward=save_for_backward)
        if save_for_backward:
            self._pending.append((counts, ids.shape[1]))
        return self._scatter(out, counts, x)

    def backward(self, grad_output, optimizer_grad_scale: float = 1.0):
        if not self._pending:
            raise RuntimeError("kt rank-0-only experts: backward without a forward that kept its cache")
        counts, k = self._pending.pop()
        g = self._gather(grad_output, counts)
        grad_input = grad_weights = None
        if self.rank == 0:
            # The sum over ranks of each rank's gradient, averaged as DDP would: / world_size.
            grad_input, grad_weights = self.backend.backward(
                g, optimizer_grad_scale=optimizer_grad_scale / self.world)
        gi = self._scatter(grad_input, counts, torch.empty((0, grad_output.shape[1]), dtype=grad_output.dtype))
        gw = self._scatter(grad_weights, counts, torch.empty((0, k), dtype=torch.float32))
        for buf in self._grad_buffers:
            staged = buf.to(self._device)
            dist.broadcast(staged, src=0)
            if staged is not buf:
                buf.copy_(staged)
        return gi, gw


def kt_allreduce_lora_grads(model) -> int:
    """Averages the experts' LoRA gradients (``.grad``) over the ranks, for kt layers whose experts every
    rank holds (``kt_rank0_experts=False``); call it between ``backward`` and ``optimizer.step``.

    Needed under FSDP2 with a copy of the experts per rank: ``fully_shard`` is applied to the modules
    without kt experts only (kt holds the experts' LoRA as whole CPU tensors it reads in place, which FSDP
    cannot shard), so nothing else averages those gradients. Under DDP it is not needed (DDP averages
    them), and layers with rank-0-only experts are skipped (their gradients arrive averaged). Collectives
    run on the CPU for gloo, on the current GPU for NCCL. Returns the number of tensors averaged."""
    from .layer import KTMoELayerWrapper

    rank, world = distributed_world()
    if world < 2:
        return 0
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    n = 0
    for w in (m for m in model.modules() if isinstance(m, KTMoELayerWrapper)):
        if isinstance(w.backend, Rank0Backend) or not w.has_lora:
            continue
        for p in w.trainable_lora_parameters():
            if p.grad is None:
                raise RuntimeError(
                    f"kt layer {w.layer_idx}: a LoRA parameter has no gradient; call kt_allreduce_lora_grads after "
                    "backward (every rank must call it after the same backward)"
                )
            g = p.grad.to(device=device, dtype=torch.float32)
            dist.all_reduce(g)
            p.grad.copy_(g / world)
            n += 1
    return n
