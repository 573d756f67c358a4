"""kt_kernel: CPU kernels for the routed experts of Mixture-of-Experts models.

Entry point: ``KTMoEWrapper`` (see ``kt_kernel.experts``). The kernel path is chosen once at import from the
environment variable ``KT_ISA`` (unset: the best this CPU supports; an unknown or unsupported value makes
the import fail) and reported as ``__cpu_variant__``.
"""

from ._version import __version__
from . import _native
from .experts import INFERENCE_METHODS, KT_INFERENCE_EXTENSIONS, SFT_METHODS, KTMoEWrapper
from .experts_base import BaseMoEWrapper, KExpertsCPUBuffer
from .masks import generate_gpu_experts_masks
from .utils.native import NativeMoEWrapper

#: The kernel path in use, in KT_ISA spelling (scalar, avx2, avx512, avx512_vnni, avx512_bf16, amx).
__cpu_variant__: str = _native.ISA


def cpu_features() -> str:
    """One line describing the CPU features kt detected (for bug reports)."""
    return _native._kt.cpu_features()


__all__ = [
    "__version__",
    "__cpu_variant__",
    "KTMoEWrapper",
    "INFERENCE_METHODS",
    "KT_INFERENCE_EXTENSIONS",
    "SFT_METHODS",
    "BaseMoEWrapper",
    "KExpertsCPUBuffer",
    "NativeMoEWrapper",
    "generate_gpu_experts_masks",
    "cpu_features",
]
