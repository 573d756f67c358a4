"""A minimal safetensors reader in numpy, for the fixture tests (no dependency on the safetensors package).

Format: an 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the end of the header), then the data.
"""

from __future__ import annotations

import json
import struct
from typing import Dict

import numpy as np
import torch

# safetensors dtype -> (numpy dtype of the raw data, torch dtype to view it as).
_DTYPES = {
    "BF16": (np.int16, torch.bfloat16),  # torch 1.13 has no uint16: go through int16, then view as bf16.
    "F16": (np.float16, torch.float16),
    "F32": (np.float32, torch.float32),
    "I64": (np.int64, torch.int64),
}


class SafeTensorsFile:
    """Reads tensors by name from one .safetensors file (the whole file is memory-mapped)."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        self.header: Dict[str, dict] = header
        self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a new torch tensor."""
        try:
            entry = self.header[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None
        if entry["dtype"] not in _DTYPES:
            raise NotImplementedError(f"{self.path}: {name}: dtype {entry['dtype']} not supported")
        np_dtype, torch_dtype = _DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        raw = np.frombuffer(self._data[begin:end].tobytes(), dtype=np_dtype)
        expected = int(np.prod(entry["shape"], dtype=np.int64)) if entry["shape"] else 1
        if raw.size != expected:
            raise ValueError(f"{self.path}: {name}: {raw.size} elements for shape {entry['shape']}")
        return torch.from_numpy(raw.copy()).view(torch_dtype).reshape(entry["shape"])
