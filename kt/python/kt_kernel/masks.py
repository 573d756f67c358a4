"""Choosing which experts run on the GPU."""

from __future__ import annotations

import torch

from ._checks import check_int


def generate_gpu_experts_masks(activation_freq: torch.Tensor, num_gpu_experts: int) -> torch.Tensor:
    """Picks the ``num_gpu_experts`` most frequently activated (layer, expert) pairs over all layers.

    Args:
        activation_freq: float or integer tensor [L, E], how often each expert of each layer was routed to.
        num_gpu_experts: how many (layer, expert) pairs in total go to the GPU (0 .. L*E).

    Returns:
        bool CPU tensor [L, E]; row l is the ``gpu_experts_mask`` for layer l. Ties are broken towards the
        lower (layer, expert) index, so the result is deterministic.
    """
    if not isinstance(activation_freq, torch.Tensor):
        raise TypeError(f"activation_freq must be a torch.Tensor, got {type(activation_freq).__name__}")
    if activation_freq.dim() != 2:
        raise ValueError(f"activation_freq must have shape [L, E], got {list(activation_freq.shape)}")
    if activation_freq.dtype == torch.bool or activation_freq.is_complex():
        raise TypeError(f"activation_freq must be a real numeric tensor, got {activation_freq.dtype}")
    total = activation_freq.numel()
    check_int("num_gpu_experts", num_gpu_experts, minimum=0)
    if num_gpu_experts > total:
        raise ValueError(
            f"num_gpu_experts ({num_gpu_experts}) exceeds the number of (layer, expert) pairs ({total})"
        )
    flat = activation_freq.detach().to("cpu", torch.float64).reshape(-1)
    # Stable descending sort: equal frequencies keep index order.
    order = torch.sort(flat, descending=True, stable=True).indices[:num_gpu_experts]
    mask = torch.zeros(total, dtype=torch.bool)
    mask[order] = True
    return mask.reshape(activation_freq.shape)
