"""Base pieces of the SFT backends (not implemented yet)."""

from __future__ import annotations

import threading
from typing import Dict


class KExpertsSFTBuffer:
    """Cache of the SFT forward/backward buffers, shared by all layers. Empty until SFT lands."""

    _lock = threading.Lock()
    _cache: Dict[object, object] = {}

    @classmethod
    def clear_cache(cls) -> None:
        """Drops every cached SFT buffer."""
        with cls._lock:
            cls._cache.clear()


class BaseSFTMoEWrapper:
    """The SFT backend of one MoE layer. Not implemented yet in kt."""

    def __init__(self, *args, method: str = "AMXBF16_SFT", **kwargs):
        raise NotImplementedError(f"BaseSFTMoEWrapper: SFT method '{method}' is not implemented yet in kt")
