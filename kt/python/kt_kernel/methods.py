"""kt's method table, read from the C++ library.

A method is described in one place, ``kt/io/method.cc``: its stored layout, whether it takes ``group_size``,
whether a kernel runs it yet, and (through ``kt/moe/layer_loader.h``) the C++ layer format that holds it.
Python reads that table here instead of repeating it, so a new weight format is added in C++ only.
"""

from __future__ import annotations

from typing import Dict

from . import _native

#: Every method kt can store -> {"format", "layout", "takes_group_size", "not_loadable"} (see ``_kt.method_table``).
METHODS: Dict[str, dict] = {row["method"]: row for row in _native._kt.method_table()}

#: The inference methods a kt kernel runs -> the C++ layer's expert format ('bf16', 'int8', 'int4',
#: 'int4_asym', 'int4_group_sym', 'int4_group_asym').
METHOD_FORMATS: Dict[str, str] = {m: row["format"] for m, row in METHODS.items() if not row["not_loadable"]}

#: The group sizes of the K-group formats.
GROUP_SIZES = (32, 64, 128)


def sft_base_format(method: str, group_size: int) -> str:
    """The expert format of an SFT method's frozen base (``AMXINT8_SFT`` -> 'int8'; ``_SkipLoRA`` variants
    as their base). ValueError for an unknown method, or a group size the K-group methods do not take."""
    base = _native._kt.sft_base_method(method)
    if METHODS[base]["takes_group_size"] and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be 32, 64 or 128 for {method}, got {group_size}")
    return METHOD_FORMATS[base]
