"""``LlamafileMoEWrapper``: method ``LLAMAFILE``, the routed experts of a GGUF checkpoint (llama.cpp's
expert-stacked ``blk.L.ffn_{gate,up,down}_exps.weight``) computed by kt's own kernels on the file's ggml
blocks as stored: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (activations quantized to the
type's ggml dot partner, Q8_0 per 32 or Q8_K per 256 values, as ggml does) and BF16, F16, F32 (bf16
activations). The projections may differ in type (Q4_K gate/up with Q6_K down, as Q4_K_M files have), except
that float and quantized projections do not mix in one layer, and gate and up share their dot partner.

``weight_path`` is a ``.gguf`` file, any part of a split set (``<prefix>-00001-of-00003.gguf``: every part
is opened) or a folder of one model's ``.gguf`` files. The layer reads the types of layer ``layer_idx``'s
tensors when it is constructed (so the shape and types are checked then, with errors naming the tensor and
the dimension) and copies the blocks in ``load_weights``. Other ggml types are a ValueError naming the
tensor and listing the supported ones.
"""

from __future__ import annotations

import errno
import os
from typing import Optional

import torch

from .. import _native
from .native import NativeMoEWrapper

__all__ = ["LlamafileMoEWrapper", "GGUF_TYPES"]

#: The ggml types method LLAMAFILE runs, by ggml type id.
GGUF_TYPES = {
    2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
    14: "Q6_K", 30: "BF16", 1: "F16", 0: "F32",
}


class LlamafileMoEWrapper(NativeMoEWrapper):
    """``LLAMAFILE``: GGUF expert blocks as stored, on the best path the CPU has (``wrapper.isa``);
    ``gguf_types`` names the ggml type of gate, up and down."""

    _EXTRA_METHODS = frozenset(["LLAMAFILE"])

    def _layer_format(self, a):
        if self.tensor_parallel:
            raise NotImplementedError(
                "method LLAMAFILE runs on one pool for now: pass threadpool_count=1 (and numa_nodes=None)"
            )
        if self.weight_path is None:
            raise ValueError(
                "method LLAMAFILE reads the experts from weight_path (a .gguf file, a part of a split set or a "
                "folder of .gguf files); got weight_path=None"
            )
        if not os.path.exists(self.weight_path):
            raise FileNotFoundError(errno.ENOENT, "LlamafileMoEWrapper: weight_path does not exist", self.weight_path)
        info = _native._kt.gguf_layer_info(
            self.weight_path, self.layer_idx, self.num_experts, self.hidden_size, self.moe_intermediate_size
        )
        self.gguf_types = tuple(GGUF_TYPES[t] for t in info["types"])
        return info["format"], list(info["types"])

    def load_weights(self, physical_to_logical_map_cpu: Optional[torch.Tensor] = None) -> None:
        """Copies layer ``layer_idx``'s expert blocks from ``weight_path`` (checked again against the types
        the layer was made for). A failed load leaves the weights loaded before, if any, in use.

        Args:
            physical_to_logical_map_cpu: int64 CPU tensor [E] or None (identity), as for the other methods.
        """
        map_ptr = self._check_map(physical_to_logical_map_cpu)
        self.last_load_stats = self._moe.load_from_path(
            self.weight_path, self.layer_idx, self.method, 128, map_ptr, self._pool()
        )

    def load_weights_from_tensors(self, *args, **kwargs) -> None:
        raise ValueError(
            "method LLAMAFILE loads the GGUF checkpoint's blocks from weight_path (load_weights); "
            "load_weights_from_tensors takes bf16 tensors: use method BF16 or an integer method for those"
        )
