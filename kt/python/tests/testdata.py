"""The repository's test checkpoints (testdata/hf, made by tools/make_fixtures.py) for the Python tests.

Each folder holds a tiny Hugging Face MoE model written by transformers and `reference.npz`, what
transformers computes for its first MoE layer (see testdata/README.md). This module finds the folders
(Bazel runfiles, else $KT_TESTDATA, else the source tree) and reads a layer's experts independently of kt:
with the numpy safetensors reader, in any layout the families use.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import numpy as np
import pytest
import torch

from safetensors_np import SafeTensorsFile

TOKENS = (1, 7, 33)


def root() -> str:
    """The testdata/hf folder."""
    candidates = [os.environ.get("KT_TESTDATA", "")]
    for runfiles in (os.environ.get("RUNFILES_DIR"), os.environ.get("TEST_SRCDIR")):
        if runfiles:
            candidates.append(os.path.join(runfiles, os.environ.get("TEST_WORKSPACE", "kt"), "testdata", "hf"))
    here = os.path.dirname(os.path.abspath(__file__))
    candidates.append(os.path.normpath(os.path.join(here, "..", "..", "..", "testdata", "hf")))
    for path in candidates:
        if path and os.path.isdir(path):
            return path
    pytest.fail(f"testdata/hf not found (looked in {[c for c in candidates if c]}); "
                "in Bazel the test needs data = [\"//testdata:hf\"]", pytrace=False)


def kt_binary() -> str:
    """//tools:kt from Bazel's runfiles, or $KT_BIN (the AMX host, where tools/amx_host/pack.sh carries it)."""
    candidates = [os.environ.get("KT_BIN", "")]
    for runfiles in (os.environ.get("RUNFILES_DIR"), os.environ.get("TEST_SRCDIR")):
        if runfiles:
            candidates.append(os.path.join(runfiles, os.environ.get("TEST_WORKSPACE", "kt"), "tools", "kt"))
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.fail("the kt binary is not in the runfiles (data = [\"//tools:kt\"]) and $KT_BIN is not set",
                pytrace=False)


def flip_byte(path: str, from_end: int = 64) -> None:
    """Flips the low bit of the byte `from_end` bytes before the end of `path` (a corrupted file)."""
    with open(path, "r+b") as f:
        f.seek(-from_end, os.SEEK_END)
        byte = f.read(1)
        f.seek(-from_end, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))


def names():
    """Every checkpoint folder's name, sorted."""
    return sorted(d for d in os.listdir(root()) if os.path.isfile(os.path.join(root(), d, "config.json")))


def path(name: str) -> str:
    return os.path.join(root(), name)


def config(name: str) -> dict:
    with open(os.path.join(path(name), "config.json")) as f:
        return json.load(f)


def text_config(name: str) -> dict:
    c = config(name)
    return c.get("text_config", c)


def shape(name: str) -> Tuple[int, int, int, int]:
    """(E, k, H, I) of the routed experts."""
    c = text_config(name)
    E = c.get("n_routed_experts", c.get("num_experts", c.get("num_local_experts")))
    I = c.get("moe_intermediate_size", c.get("intermediate_size"))
    return E, c["num_experts_per_tok"], c["hidden_size"], I


def reference(name: str) -> Dict[str, np.ndarray]:
    return dict(np.load(os.path.join(path(name), "reference.npz")))


def inputs(ref: Dict[str, np.ndarray], T: int):
    """x (bf16), ids (int64), weights (fp32), routed (fp32 expected) for T tokens of a reference."""
    x = torch.from_numpy(ref[f"x_{T}"]).to(torch.bfloat16)  # bf16 values stored as float32: exact.
    ids = torch.from_numpy(ref[f"ids_{T}"]).to(torch.int64).contiguous()
    weights = torch.from_numpy(ref[f"weights_{T}"]).to(torch.float32).contiguous()
    return x, ids, weights, torch.from_numpy(ref[f"routed_{T}"])


def stacked_experts(name: str, layer: int):
    """gate/up [E, I, H] and down [E, H, I] of MoE layer `layer`, read with the numpy reader: per-expert
    tensors (gate_proj/up_proj/down_proj or w1/w3/w2), or fused gate_up_proj in either order (the order
    told by down_proj's shape, [E, H, I] or [E, I, H]). bf16; FP8 tensors are not read here."""
    E, _, H, I = shape(name)
    st = SafeTensorsFile(os.path.join(path(name), "model.safetensors"))
    keys = set(st.keys())
    prefix = next(p for p in ("model.language_model.layers", "model.layers")
                  if any(k.startswith(f"{p}.{layer}.") for k in keys))
    block = "block_sparse_moe" if f"{prefix}.{layer}.block_sparse_moe.gate.weight" in keys else "mlp"
    base = f"{prefix}.{layer}.{block}.experts."
    if base + "gate_up_proj" in keys:
        gu, down = st.get(base + "gate_up_proj"), st.get(base + "down_proj")
        if tuple(down.shape) == (E, I, H):  # [E, H, 2I] and [E, I, H]: transpose to out-in.
            gu, down = gu.transpose(1, 2), down.transpose(1, 2)
        assert tuple(gu.shape) == (E, 2 * I, H) and tuple(down.shape) == (E, H, I), (gu.shape, down.shape)
        return gu[:, :I].contiguous(), gu[:, I:].contiguous(), down.contiguous()
    g, u, d = ("w1", "w3", "w2") if block == "block_sparse_moe" else ("gate_proj", "up_proj", "down_proj")

    def stack(proj):
        return torch.stack([st.get(f"{base}{e}.{proj}.weight") for e in range(E)]).contiguous()

    return stack(g), stack(u), stack(d)
