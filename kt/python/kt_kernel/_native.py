"""Loads the C++ extension, picks the kernel path and owns the process-wide worker pool.

Kernel path (ISA): read once, at import, from the environment variable ``KT_ISA`` (one of ``scalar``,
``avx2``, ``avx512``, ``avx512_vnni``, ``avx512_bf16``, ``amx``). Unset or empty means the best path this CPU
supports. A name kt does not know, a path this CPU cannot run, or one kt does not implement yet makes
``import kt_kernel`` fail with the reason: kt never silently runs a different path than the one asked for.

Worker pool: every wrapper in the process shares one pool of ``cpuinfer_threads`` worker threads (as the
original kt-kernel shares one CPUInfer). The pool is created by the first wrapper; a later wrapper asking for
more threads replaces it with a larger one, which all wrappers then use (a smaller request reuses the larger
pool). Wrappers look the pool up at every call, so they always use the current one.
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
        "libabsl (20220623) and libhwy."
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


def current_thread_pool():
    """The process-wide pool, or None if no wrapper has been created yet."""
    return _pool
