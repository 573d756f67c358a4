"""``MOE_INT8`` / ``MOE_INT4``: the portable integer kernels (no AMX tiles), as the original's "general"
MoE kernel.

Same formats as ``AMXINT8`` / ``AMXINT4`` (symmetric per output channel, activations per token), and the kt
extensions ``MOE_INT4_1`` / ``MOE_INT4_KGroup`` / ``MOE_INT4_1KGroup`` (the formats of ``AMXINT4_1`` /
``AMXINT4_KGroup`` / ``AMXINT4_1KGroup``), but the kernel path stops at AVX512-VNNI (``vpdpbusd``) even on a CPU with AMX, so
speed matches CPUs without AMX (AMD EPYC, older Xeons). Every path computes the same integer sums and the
same fp32 epilogue, so results equal the AMX methods' bit for bit.
"""

from __future__ import annotations

from .native import NativeMoEWrapper


class GeneralMoEWrapper(NativeMoEWrapper):
    """int8/int4 experts on the portable kernels: VNNI, Highway AVX3/AVX2 or scalar, whichever the CPU has."""

    @staticmethod
    def _kernel_isa(process_isa: str) -> str:
        # The VNNI kernel serves both avx512_bf16 and avx512_vnni; only AMX tiles are excluded.
        return "avx512_bf16" if process_isa == "amx" else process_isa
