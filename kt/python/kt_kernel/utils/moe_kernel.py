"""``MOE_INT8``: the portable int8 kernels (no AMX tiles), as the original's "general" MoE kernel.

Same int8 format as ``AMXINT8`` (symmetric per output channel, activations per token), but the kernel path
stops at AVX512-VNNI (``vpdpbusd``) even on a CPU with AMX, so results and speed match CPUs without AMX
(AMD EPYC, older Xeons). ``MOE_INT4`` is not implemented yet.
"""

from __future__ import annotations

from .amx import NativeMoEWrapper


class GeneralMoEWrapper(NativeMoEWrapper):
    """int8 experts on the portable kernels: VNNI, Highway AVX3/AVX2 or scalar, whichever the CPU has."""

    @staticmethod
    def _kernel_isa(process_isa: str) -> str:
        # The VNNI kernel serves both avx512_bf16 and avx512_vnni; only AMX tiles are excluded.
        return "avx512_bf16" if process_isa == "amx" else process_isa
