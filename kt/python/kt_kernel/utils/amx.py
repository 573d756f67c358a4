"""``AMXMoEWrapper``: the ``AMX*`` inference methods (``AMXINT8``, ``AMXINT4``, ``AMXINT4_1``, ``AMXINT4_KGroup``,
``AMXINT4_1KGroup``) and the native int4 checkpoints (``RAWINT4``, ``GPTQ_INT4``), AMX tiles where the CPU has
them.

``NativeMoEWrapper`` (the ``BF16`` backend and the base of this one) lives in ``utils/native.py``; it is
re-exported here because the original kt-kernel's users import both from ``kt_kernel.utils.amx``; so is
``FP8MoEWrapper`` (method ``FP8``, ``utils/fp8.py``).
"""

from __future__ import annotations

from .fp8 import FP8MoEWrapper  # noqa: F401 (re-exported, beside NativeMoEWrapper)
from .native import _IMPLEMENTED_METHODS, _METHOD_FORMATS, NativeMoEWrapper  # noqa: F401 (re-exported)

__all__ = ["AMXMoEWrapper", "FP8MoEWrapper", "NativeMoEWrapper"]


class AMXMoEWrapper(NativeMoEWrapper):
    """``AMXINT8``, ``AMXINT4``, ``AMXINT4_1``, ``AMXINT4_KGroup``, ``AMXINT4_1KGroup``: quantized experts, quantized online
    by ``load_weights_from_tensors``.

    Uses AMX tiles where the CPU has them (and Linux grants the permission); elsewhere the best path the CPU
    has, named by ``wrapper.isa``. ``load_weights`` reads ``weight_path`` (an HF folder,
    quantized at load, or ``kt convert --method AMXINT8`` output).
    """

