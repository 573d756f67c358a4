"""Argument checks shared by the wrappers. Every message names the argument and says expected vs got.

Conventions: a value of the wrong Python type or tensor dtype is a TypeError; a wrong shape, device, layout
(non-contiguous) or value is a ValueError.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import torch


def check_int(name: str, value, minimum: Optional[int] = None) -> int:
    """Checks that ``value`` is an integer (any Integral, e.g. numpy.int64; bool is not) and at least
    ``minimum``; returns it as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """Checks that ``value`` is a bool (Python's, or numpy's bool_); an int such as 0/1 is not, so a
    misplaced positional argument is caught."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return bool(value)


def _shape_str(shape: Sequence[object]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_tensor(
    name: str,
    tensor,
    dtype: torch.dtype,
    shape: Sequence[Optional[int]],
    shape_doc: str,
) -> torch.Tensor:
    """Checks a CPU, contiguous tensor of ``dtype`` and ``shape`` (None = any size); returns it.

    ``shape_doc`` names the dimensions for the message, e.g. ``"[E, I, H]"``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {tensor.dtype}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got device {tensor.device}")
    got = tuple(tensor.shape)
    if len(got) != len(shape) or any(want is not None and want != g for want, g in zip(shape, got)):
        expected = _shape_str("*" if d is None else d for d in shape)
        raise ValueError(f"{name} must have shape {shape_doc} = {expected}, got {_shape_str(got)}")
    if not tensor.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (row-major), got strides {tuple(tensor.stride())} for shape "
            f"{_shape_str(got)}; pass {name}.contiguous()"
        )
    return tensor


def check_moe_shape(
    layer_idx, num_experts, num_experts_per_tok, hidden_size, moe_intermediate_size
) -> Tuple[int, int, int, int, int]:
    """Checks one MoE layer's shape arguments (the same for inference and SFT wrappers): layer_idx >= 0, the
    sizes >= 1 and num_experts_per_tok <= num_experts. Returns them as Python ints, in argument order."""
    layer_idx = check_int("layer_idx", layer_idx, minimum=0)
    num_experts = check_int("num_experts", num_experts, minimum=1)
    num_experts_per_tok = check_int("num_experts_per_tok", num_experts_per_tok, minimum=1)
    if num_experts_per_tok > num_experts:
        raise ValueError(f"num_experts_per_tok ({num_experts_per_tok}) must be <= num_experts ({num_experts})")
    hidden_size = check_int("hidden_size", hidden_size, minimum=1)
    moe_intermediate_size = check_int("moe_intermediate_size", moe_intermediate_size, minimum=1)
    return layer_idx, num_experts, num_experts_per_tok, hidden_size, moe_intermediate_size


def check_expert_weights(gate_proj, up_proj, down_proj, E: int, I: int, H: int) -> None:
    """Checks the experts' bf16 weights as ``load_weights_from_tensors`` takes them: gate_proj and up_proj
    [E, I, H], down_proj [E, H, I], CPU and contiguous."""
    check_tensor("gate_proj", gate_proj, torch.bfloat16, (E, I, H), "[E, I, H]")
    check_tensor("up_proj", up_proj, torch.bfloat16, (E, I, H), "[E, I, H]")
    check_tensor("down_proj", down_proj, torch.bfloat16, (E, H, I), "[E, H, I]")


def check_expert_map(physical_to_logical_map_cpu, E: int) -> Optional[torch.Tensor]:
    """Checks a physical -> logical expert map: None (identity), or an int64 CPU tensor [E] with every entry
    in [0, E). Returns it (None stays None)."""
    if physical_to_logical_map_cpu is None:
        return None
    mapping = check_tensor("physical_to_logical_map_cpu", physical_to_logical_map_cpu, torch.int64, (E,), "[E]")
    bad = (mapping < 0) | (mapping >= E)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"physical_to_logical_map_cpu entries must be in [0, {E}), got {int(mapping[i])} at index {i}"
        )
    return mapping


def check_routing(ids_name: str, ids, weights_name: str, weights, qlen: int, num_experts_per_tok: int) -> int:
    """Checks a forward's routing for ``qlen`` tokens: expert ids int64 [qlen, k] with
    1 <= k <= num_experts_per_tok and their weights float32 [qlen, k], CPU and contiguous. The names are the
    caller's argument names, for the messages. Returns k."""
    check_tensor(ids_name, ids, torch.int64, (qlen, None), "[qlen, k]")
    k = ids.shape[1]
    if not 1 <= k <= num_experts_per_tok:
        raise ValueError(
            f"{ids_name} must have 1 <= k <= num_experts_per_tok ({num_experts_per_tok}) columns, "
            f"got shape {list(ids.shape)}"
        )
    check_tensor(weights_name, weights, torch.float32, (qlen, k), "[qlen, k]")
    return k
