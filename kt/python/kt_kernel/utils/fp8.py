"""``FP8MoEWrapper``: method ``FP8``, FP8 E4M3 weights with a scale per 128 x 128 block (kt-fp8-block128-v1:
DeepSeek-V3/R1, Qwen3-FP8, MiniMax-M2 as shipped), held as given and decoded in registers by the kernels;
activations bf16. ``load_weights`` reads an FP8 Hugging Face folder (``weight`` + ``weight_scale_inv``)
without a bf16 copy; ``load_weights_from_tensors`` takes float8_e4m3fn tensors with their scales (or bf16
tensors, quantized as DeepSeek does: scale = amax / 448 per block).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_tensor
from .native import NativeMoEWrapper

__all__ = ["FP8MoEWrapper", "FP8PerChannelMoEWrapper"]


class FP8MoEWrapper(NativeMoEWrapper):
    """``FP8``: experts held as FP8 E4M3 with one fp32 scale per 128 x 128 block (kt-fp8-block128-v1), on the
    best path the CPU has (``wrapper.isa``). ``load_weights`` reads an FP8 Hugging Face folder as stored (or a
    ``kt convert --method FP8`` folder)."""

    def load_weights_from_tensors(
        self,
        gate_proj: torch.Tensor,
        up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        physical_to_logical_map_cpu: Optional[torch.Tensor] = None,
        gate_scale_inv: Optional[torch.Tensor] = None,
        up_scale_inv: Optional[torch.Tensor] = None,
        down_scale_inv: Optional[torch.Tensor] = None,
    ) -> None:
        """Packs the experts' weights.

        Args:
            gate_proj, up_proj: torch.float8_e4m3fn CPU tensors [E, I, H]; down_proj [E, H, I]; contiguous
                (torch.uint8 tensors of the same E4M3 bytes are accepted too, for torch < 2.1).
                bf16 tensors are accepted too (then without scales): they are quantized per 128 x 128 block,
                scale = amax / 448, as DeepSeek's quantizer does.
            physical_to_logical_map_cpu: int64 CPU tensor [E] or None (identity), as for the other methods.
            gate_scale_inv, up_scale_inv: float32 CPU tensors [E, ceil(I/128), ceil(H/128)];
            down_scale_inv: [E, ceil(H/128), ceil(I/128)]: each expert's ``weight_scale_inv`` (the weight is
                fp8 value * scale_inv[n // 128][k // 128]).
        """
        if gate_proj.dtype == torch.bfloat16:
            if any(s is not None for s in (gate_scale_inv, up_scale_inv, down_scale_inv)):
                raise ValueError("bf16 weights take no scales (they are quantized here); pass float8_e4m3fn "
                                 "weights with their *_scale_inv")
            super().load_weights_from_tensors(gate_proj, up_proj, down_proj, physical_to_logical_map_cpu)
            return
        E, I, H = self.num_experts, self.moe_intermediate_size, self.hidden_size
        # float8_e4m3fn where torch has it (>= 2.1); uint8 holding the E4M3 bytes otherwise (or by choice).
        fp8 = getattr(torch, "float8_e4m3fn", torch.uint8)
        if gate_proj.dtype == torch.uint8:
            fp8 = torch.uint8
        check_tensor("gate_proj", gate_proj, fp8, (E, I, H), "[E, I, H]")
        check_tensor("up_proj", up_proj, fp8, (E, I, H), "[E, I, H]")
        check_tensor("down_proj", down_proj, fp8, (E, H, I), "[E, H, I]")
        bi, bh = -(-I // 128), -(-H // 128)
        for name, t, shape, doc in (
            ("gate_scale_inv", gate_scale_inv, (E, bi, bh), "[E, ceil(I/128), ceil(H/128)]"),
            ("up_scale_inv", up_scale_inv, (E, bi, bh), "[E, ceil(I/128), ceil(H/128)]"),
            ("down_scale_inv", down_scale_inv, (E, bh, bi), "[E, ceil(H/128), ceil(I/128)]"),
        ):
            if t is None:
                raise ValueError(f"{name} is required with float8_e4m3fn weights (the 128 x 128 block scales, "
                                 f"float32 {doc})")
            check_tensor(name, t, torch.float32, shape, doc)
        map_ptr = self._check_map(physical_to_logical_map_cpu)
        self._moe.load_weights_fp8(
            gate_proj.data_ptr(), up_proj.data_ptr(), down_proj.data_ptr(), gate_scale_inv.data_ptr(),
            up_scale_inv.data_ptr(), down_scale_inv.data_ptr(), map_ptr, self._pool()
        )


class FP8PerChannelMoEWrapper(NativeMoEWrapper):
    """``FP8_PERCHANNEL``: FP8 E4M3 experts with one fp32 scale per output channel (GLM-4.x FP8's ``weight`` +
    ``weight_scale`` [N] or [N, 1]). Held as kt-fp8-block128-v1 with each row's scale repeated over its 128-k
    blocks (the same weights exactly), so the FP8 kernels run it. ``load_weights`` reads such a Hugging Face
    folder as stored."""

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
            gate_proj, up_proj: torch.float8_e4m3fn (or uint8 E4M3 bytes) CPU tensors [E, I, H]; down_proj
                [E, H, I]; contiguous.
            physical_to_logical_map_cpu: int64 CPU tensor [E] or None (identity), as for the other methods.
            gate_scale, up_scale: float32 (or bf16) CPU tensors [E, I] or [E, I, 1]; down_scale [E, H] or
                [E, H, 1]: each expert's ``weight_scale`` (the weight is fp8 value * scale[n]).
        """
        if gate_proj.dtype == torch.bfloat16:
            raise TypeError(
                "FP8_PERCHANNEL takes float8_e4m3fn weights with their per-channel weight_scale (as GLM-4.x FP8 "
                "ships them), got bfloat16; for bf16 weights use method FP8 (quantized per 128 x 128 block) or "
                "an integer method"
            )
        E, I, H = self.num_experts, self.moe_intermediate_size, self.hidden_size
        fp8 = getattr(torch, "float8_e4m3fn", torch.uint8)
        if gate_proj.dtype == torch.uint8:
            fp8 = torch.uint8
        check_tensor("gate_proj", gate_proj, fp8, (E, I, H), "[E, I, H]")
        check_tensor("up_proj", up_proj, fp8, (E, I, H), "[E, I, H]")
        check_tensor("down_proj", down_proj, fp8, (E, H, I), "[E, H, I]")
        scales = []
        for name, t, n in (("gate_scale", gate_scale, I), ("up_scale", up_scale, I), ("down_scale", down_scale, H)):
            rows = "I" if n == I else "H"
            if t is None:
                raise ValueError(f"{name} is required with float8_e4m3fn weights (the per-channel scales, float32 "
                                 f"[E, {rows}] or [E, {rows}, 1])")
            if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16:
                t = t.float()  # exact
            if isinstance(t, torch.Tensor) and t.dim() == 3:
                check_tensor(name, t, torch.float32, (E, n, 1), f"[E, {rows}, 1]")
            else:
                check_tensor(name, t, torch.float32, (E, n), f"[E, {rows}]")
            scales.append(t)
        map_ptr = self._check_map(physical_to_logical_map_cpu)
        self._keep_scales = scales  # the bf16 -> float32 copies must live through the call
        self._moe.load_weights_coded(
            "fp8_channel", gate_proj.data_ptr(), up_proj.data_ptr(), down_proj.data_ptr(),
            *(s.data_ptr() for s in scales), map_ptr, self._pool()
        )
        self._keep_scales = None
