"""``RawInt4MoEWrapper``: method ``RAWINT4``, compressed-tensors pack-quantized INT4 (Kimi-K2's routed experts)
held exactly as kt-int4-group{G}-sym-v1 (docs/FORMATS.md, "Native int4 checkpoints"). ``load_weights`` reads
the Hugging Face folder as stored; ``load_weights_from_tensors`` takes the checkpoint's tensors as they are
(``weight_packed`` + ``weight_scale``), or bf16 tensors to quantize at ``group_size``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_tensor
from .amx import AMXMoEWrapper

__all__ = ["RawInt4MoEWrapper"]


class RawInt4MoEWrapper(AMXMoEWrapper):
    """``RAWINT4``: int4 experts with a bf16 scale per group of G = ``group_size`` along K (the checkpoint's when
    built from ``weight_path``), run by the int4 group kernels on the best path the CPU has (``wrapper.isa``)."""

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
            gate_proj, up_proj: each expert's ``weight_packed`` stacked, torch.int32 CPU tensors [E, I, H/8]
                (8 nibbles per word, element 8i + j at bits 4j, offset binary: q + 8) or torch.uint8
                [E, I, H/2] (2 per byte, element 2i low); down_proj [E, H, I/8] (uint8 [E, H, I/2]);
                contiguous. bf16 tensors [E, I, H] / [E, H, I] are accepted too (then without scales): they
                are quantized here, symmetric int4 per group of ``group_size``.
            physical_to_logical_map_cpu: int64 CPU tensor [E] or None (identity), as for the other methods.
            gate_scale, up_scale: torch.bfloat16 CPU tensors [E, I, H/G] (``weight_scale``); down_scale
                [E, H, I/G]; G = ``self.group_size``. The weight is q * scale[n][k // G].
        """
        if gate_proj.dtype == torch.bfloat16:
            if any(s is not None for s in (gate_scale, up_scale, down_scale)):
                raise ValueError("bf16 weights take no scales (they are quantized here); pass the int32 (or uint8) "
                                 "weight_packed tensors with their bf16 weight_scale")
            super().load_weights_from_tensors(gate_proj, up_proj, down_proj, physical_to_logical_map_cpu)
            return
        E, I, H, G = self.num_experts, self.moe_intermediate_size, self.hidden_size, self.group_size
        dtype = torch.uint8 if gate_proj.dtype == torch.uint8 else torch.int32
        per = 2 if dtype == torch.uint8 else 8
        doc = "K/2] (uint8: 2 nibbles per byte)" if per == 2 else "K/8] (int32: 8 nibbles per word)"
        check_tensor("gate_proj", gate_proj, dtype, (E, I, H // per), "[E, I, " + doc.replace("K", "H"))
        check_tensor("up_proj", up_proj, dtype, (E, I, H // per), "[E, I, " + doc.replace("K", "H"))
        check_tensor("down_proj", down_proj, dtype, (E, H, I // per), "[E, H, " + doc.replace("K", "I"))
        for name, t, shape, sdoc in (
            ("gate_scale", gate_scale, (E, I, H // G), f"[E, I, H/G] (G = {G})"),
            ("up_scale", up_scale, (E, I, H // G), f"[E, I, H/G] (G = {G})"),
            ("down_scale", down_scale, (E, H, I // G), f"[E, H, I/G] (G = {G})"),
        ):
            if t is None:
                raise ValueError(f"{name} is required with packed weights (the bf16 weight_scale, {sdoc})")
            check_tensor(name, t, torch.bfloat16, shape, sdoc)
        map_ptr = self._check_map(physical_to_logical_map_cpu)
        self._moe.load_weights_rawint4(
            gate_proj.data_ptr(), up_proj.data_ptr(), down_proj.data_ptr(), gate_scale.data_ptr(),
            up_scale.data_ptr(), down_scale.data_ptr(), map_ptr, self._pool()
        )
