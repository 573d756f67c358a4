"""``MXMoEWrapper``: methods ``MXFP4`` and ``MXFP8``, OCP microscaling experts held as shipped (kt-mxfp4-v1:
E2M1 codes two per byte, DeepSeek-V4-Flash / gpt-oss; kt-mxfp8-v1: E4M3 codes, MiniMax-M3), each with one
E8M0 scale (a power of two, ``2 ** (e - 127)``) per 32 consecutive k of a row; decoded in registers by the
kernels, activations bf16. ``swiglu_limit`` / ``swiglu_alpha`` (the checkpoints' clamped and "swigluoai"
activations) are taken by these methods only.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_tensor
from .native import NativeMoEWrapper

__all__ = ["MXMoEWrapper"]


def _as_bytes(name: str, t, allowed, shape, doc) -> torch.Tensor:
    """``t`` (one of the ``allowed`` dtypes, e.g. int8 or uint8 nibble pairs) checked, viewed as uint8."""
    if isinstance(t, torch.Tensor) and t.dtype in allowed and t.dtype != torch.uint8:
        check_tensor(name, t, t.dtype, shape, doc)
        return t.view(torch.uint8)
    names = " or ".join(str(d) for d in allowed)
    if isinstance(t, torch.Tensor) and t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {names}, got {t.dtype}")
    return check_tensor(name, t, torch.uint8, shape, doc)


class MXMoEWrapper(NativeMoEWrapper):
    """``MXFP4`` / ``MXFP8``: experts held as OCP MX codes with E8M0 scales per 32 k, on the best path the CPU
    has (``wrapper.isa``). ``hidden_size`` and ``moe_intermediate_size`` must be multiples of 32."""

    def load_weights_from_tensors(
        self,
        gate_proj: torch.Tensor,
        up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        physical_to_logical_map_cpu: Optional[torch.Tensor] = None,
        gate_scale: Optional[torch.Tensor] = None,
        up_scale: Optional[torch.Tensor] = None,
        down_scale: Optional[torch.Tensor] = None,
    ) -> None:
        """Packs the experts' weights.

        Args:
            gate_proj, up_proj: [E, I, H] codes, down_proj [E, H, I], contiguous CPU tensors. MXFP4: the E2M1
                nibbles two per byte, element 2i in the low nibble of byte i (int8 or uint8 [E, I, H/2],
                [E, H, I/2]; DeepSeek-V4 stores them as I8). MXFP8: float8_e4m3fn (or uint8 E4M3 bytes)
                [E, I, H], [E, H, I]. bf16 tensors are accepted too (then without scales): quantized here
                as the OCP MX specification does (shared exponent floor(log2(amax)) - emax per 32 k).
            physical_to_logical_map_cpu: int64 CPU tensor [E] or None (identity), as for the other methods.
            gate_scale, up_scale: the E8M0 scale codes, uint8 (or float8_e8m0fnu) [E, I, H/32];
                down_scale [E, H, I/32]: the weight is element * 2 ** (code - 127).
        """
        if gate_proj.dtype == torch.bfloat16:
            if any(s is not None for s in (gate_scale, up_scale, down_scale)):
                raise ValueError("bf16 weights take no scales (they are quantized here); pass the MX codes "
                                 "with their E8M0 *_scale")
            super().load_weights_from_tensors(gate_proj, up_proj, down_proj, physical_to_logical_map_cpu)
            return
        E, I, H = self.num_experts, self.moe_intermediate_size, self.hidden_size
        fp4 = self.method == "MXFP4"
        if fp4:
            allowed = (torch.int8, torch.uint8)
            gate_shape, down_shape, gdoc, ddoc = (E, I, H // 2), (E, H, I // 2), "[E, I, H/2]", "[E, H, I/2]"
        else:
            allowed = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), torch.uint8) if d is not None)
            gate_shape, down_shape, gdoc, ddoc = (E, I, H), (E, H, I), "[E, I, H]", "[E, H, I]"
        codes = [
            _as_bytes("gate_proj", gate_proj, allowed, gate_shape, gdoc),
            _as_bytes("up_proj", up_proj, allowed, gate_shape, gdoc),
            _as_bytes("down_proj", down_proj, allowed, down_shape, ddoc),
        ]
        e8m0 = tuple(d for d in (getattr(torch, "float8_e8m0fnu", None), torch.uint8) if d is not None)
        scales = []
        for name, t, shape, doc in (
            ("gate_scale", gate_scale, (E, I, H // 32), "[E, I, H/32]"),
            ("up_scale", up_scale, (E, I, H // 32), "[E, I, H/32]"),
            ("down_scale", down_scale, (E, H, I // 32), "[E, H, I/32]"),
        ):
            if t is None:
                raise ValueError(f"{name} is required with {self.method} codes (the E8M0 scale codes, uint8 {doc})")
            scales.append(_as_bytes(name, t, e8m0, shape, doc))
        map_ptr = self._check_map(physical_to_logical_map_cpu)
        self._moe.load_weights_coded(
            "e8m0", *(c.data_ptr() for c in codes), *(s.data_ptr() for s in scales), map_ptr, self._pool()
        )
