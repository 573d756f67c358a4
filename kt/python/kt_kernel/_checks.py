"""Argument checks shared by the wrappers. Every message names the argument and says expected vs got.

Conventions: a value of the wrong Python type or tensor dtype is a TypeError; a wrong shape, device, layout
(non-contiguous) or value is a ValueError.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

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
