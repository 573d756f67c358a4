"""Loads the C++ extension, picks the kernel path and owns the process-wide worker pool.

Kernel path (ISA): read once, at import, from the environment variable ``KT_ISA`` (one of ``scalar``,
``avx2``, ``avx512``, ``avx512_vnni``, ``avx512_bf16``, ``amx``). Unset or empty means the best path this CPU
supports. A name kt does not know, a path this CPU cannot run, or one kt does not implement yet makes
``import kt_kernel`` fail with the reason: kt never silently runs a different path than the one asked for.

Worker pool: every wrapper in the process shares one pool of ``cpuinfer_threads`` worker threads (as the
original kt-kernel shares one CPUInfer). The pool is created by the first wrapper; a later wrapper asking for
more threads replaces it with a larger one, which all wrappers then use (a smaller request reuses the larger
pool). Wrappers look the pool up at every call, so they always use the current one.

NUMA sub-pools: a wrapper with ``threadpool_count > 1`` or ``numa_nodes`` runs a tensor-parallel layer on
``get_node_pools``'s pools instead (one per NUMA node; see docs/SERVING.md).
"""

from __future__ import annotations

import os
import threading

try:
    from . import _kt
except ImportError as exc:  # pragma: no cover - depends on the installation.
    raise ImportError(
        f"kt_kernel: cannot load the C++ extension kt_kernel._kt ({exc}). It is built by Bazel "
        "(//kt/python:kt_kernel) or shipped in the kt_kernel wheel; it needs the system libraries "
        "libabsl (20220623), libhwy and libnuma."
    ) from exc

ISA_ENV_VAR = "KT_ISA"


def _resolve_isa() -> str:
    requested = os.environ.get(ISA_ENV_VAR, "").strip()
    try:
        return _kt.resolve_isa(requested)
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        message = str(exc)
        if ISA_ENV_VAR not in message:
            message = f"{ISA_ENV_VAR}={requested!r}: {message}"
        raise ImportError(
            f"kt_kernel: {message} (unset {ISA_ENV_VAR} to use the best path this CPU supports)"
        ) from exc


#: The kernel path in use (KT_ISA spelling), fixed at import.
ISA: str = _resolve_isa()

_pool_lock = threading.Lock()
_pool = None  # The process-wide _kt.ThreadPool, created on first use.


def get_thread_pool(num_threads: int):
    """Returns the process-wide worker pool, growing it to at least ``num_threads`` threads.

    Replacing the pool is safe while another thread computes on the old one: that call holds its own
    reference, and the old pool's threads are joined when the last reference goes away.
    """
    global _pool
    if num_threads < 1:
        raise ValueError(f"cpuinfer_threads must be >= 1, got {num_threads}")
    with _pool_lock:
        if _pool is None or _pool.num_threads < num_threads:
            _pool = _kt.ThreadPool(num_threads)
        return _pool


_node_pools = {}  # (threadpool_count, cpuinfer_threads, numa_nodes or ()) -> _kt.NodePools


def get_node_pools(count: int, num_threads: int, numa_nodes=None):
    """The NUMA sub-pools of tensor-parallel wrappers: ``count`` pools sharing ``num_threads`` threads, pool i
    pinned to node ``numa_nodes[i]`` (None: node i mod the node count; unpinned where NUMA is unavailable).

    Shared by every wrapper asking for the same (count, threads, nodes), as the single pool is. Raises
    ValueError naming cpuinfer_threads / threadpool_count / numa_nodes for a request that cannot be met (fewer
    threads than pools, a node that does not exist, nodes asked for without NUMA support).
    """
    key = (count, num_threads, tuple(numa_nodes) if numa_nodes is not None else ())
    with _pool_lock:
        pools = _node_pools.get(key)
        if pools is None:
            pools = _node_pools[key] = _kt.NodePools(count, num_threads, list(key[2]))
        return pools


def current_thread_pool():
    """The process-wide pool, or None if no wrapper has been created yet."""
    return _pool
