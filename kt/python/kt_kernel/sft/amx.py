"""``AMXSFTMoEWrapper``: the SFT methods of the original kt-kernel on kt's C++ ``SftMoeLayer``.

Method -> frozen base format (C++'s method table decides it: ``kt_kernel.methods.sft_base_format``; each on the best kernel path of the CPU, ``kt_kernel.__cpu_variant__``; AMX
tiles where present, else AVX512-BF16/VNNI, Highway AVX3/AVX2 or scalar):

=========================  ==========================================================================
AMXBF16_SFT                bf16 weights as given (kt-bf16-panel16-kpair-v1)
AMXINT8_SFT                int8 per output channel, symmetric (kt-int8-channel-v1)
AMXINT4_SFT                int4 per output channel, symmetric (kt-int4-channel-v1)
AMXINT4_1_SFT              int4 per output channel, scale and zero point (kt-int4-channel-asym-v1; the
                           original's INT4_1)
AMXINT4_KGroup_SFT         int4 groups of ``group_size`` along K, symmetric (kt-int4-group{G}-sym-v1)
AMXINT4_1KGroup_SFT        int4 groups of ``group_size``, asymmetric with zero points (kt-int4-group{G}-asym-v1)
=========================  ==========================================================================

``group_size`` (32, 64 or 128; default 128) is read by the two KGroup methods only; hidden_size and
moe_intermediate_size must be multiples of it. ``*_SkipLoRA`` runs the same base without LoRA: backward
gives grad_input and grad_weights only.

Quantized bases are quantized at load from the bf16 weights given. Backward multiplies by the transposed
base, which is the forward base dequantized, transposed and quantized again in the same format (per row
of W^T, i.e. along the other axis): a second quantization error on top of the first, of the same size
(kt/sft/README.md has the numbers).

Backward multiplies by the transposed base weights. With ``share_backward_bb=True`` all layers of the
same shape share one transposed copy, rebuilt from the forward weights of whichever layer runs backward
(saves E*3*H*I weights per layer, costs one repack per layer backward); the default (False) gives each
layer its own copy, built at load.

Activation caches: by default each layer keeps up to ``max_cache_depth`` cached forwards (and the entries'
buffers after their backward). With ``share_cache_pool=True`` all wrappers of the process with the same
shape, method and max_cache_depth share one pool of ``max_cache_depth`` entries in total, as the original's
``share_cache_pool`` does. That is only valid when one layer's caches are alive at a time, i.e. under
activation recomputation (the no-grad forward of every layer, then per layer in backward order: its
recompute forward with save_for_backward, then its backward). It saves (layers - 1) x max_cache_depth
caches: Qwen3-30B-A3B (48 layers) at qlen 4096 holds 393 MiB per cached forward, 18.4 GiB per-layer against
393 MiB pooled at depth 1. A forward with save_for_backward that would exceed the pool raises RuntimeError
naming the layers that hold its entries; nothing is lost (their backwards still work).
"""

from __future__ import annotations

from .. import _native
from .._args import SftArgs
from .._checks import check_bool, check_int
from ..methods import sft_base_format
from .base import BaseSFTMoEWrapper, KExpertsSFTBuffer

_SKIP_SUFFIX = "_SkipLoRA"


class AMXSFTMoEWrapper(BaseSFTMoEWrapper):
    """SFT backend for the ``AMX*_SFT`` methods (see the module docstring for the formats)."""

    def __init__(self, *args, **kwargs):
        """Takes an ``SftArgs`` (``kt_kernel._args``), or its fields as the original constructor did."""
        a = SftArgs.of(args, kwargs)
        super().__init__(a)
        num_experts, hidden_size, moe_intermediate_size = a.num_experts, a.hidden_size, a.moe_intermediate_size
        group_size, method = a.group_size, a.method
        self.group_size = check_int("group_size", group_size, 1)
        self.zero_point = bool(a.zero_point)
        self.skip_lora = method.endswith(_SKIP_SUFFIX)
        self.share_backward_bb = bool(a.share_backward_bb)
        self.share_cache_pool = check_bool("share_cache_pool", a.share_cache_pool)
        fmt = sft_base_format(method, self.group_size)
        isa = _native.ISA
        bwd = None
        if self.share_backward_bb:
            key = ("backward_bb", num_experts, hidden_size, moe_intermediate_size, isa, fmt, self.group_size)
            bwd = KExpertsSFTBuffer.get(
                key,
                lambda: _native._kt.SftBackwardWeights(
                    num_experts=num_experts, hidden=hidden_size, intermediate=moe_intermediate_size,
                    isa=isa, format=fmt, group_size=self.group_size,
                ),
            )
        workspace = KExpertsSFTBuffer.get(("workspace",), _native._kt.SftWorkspace)
        cache_pool = None
        if self.share_cache_pool:
            # One pool per model shape and method: the layers of one model share it. (The C++ pool sizes
            # entries per use, so this key is about not mixing two models' layers, whose caches may be alive
            # at the same time, rather than about sizes.)
            key = (
                "cache_pool", self.max_cache_depth, num_experts, a.num_experts_per_tok, hidden_size,
                moe_intermediate_size, a.chunked_prefill_size, a.lora_rank, method, self.group_size,
            )
            cache_pool = KExpertsSFTBuffer.get(
                key, lambda: _native._kt.SftCachePool(max_cache_depth=self.max_cache_depth)
            )
        self._layer = _native._kt.SftMoeLayer(
            num_experts=num_experts,
            top_k=a.num_experts_per_tok,
            hidden=hidden_size,
            intermediate=moe_intermediate_size,
            max_len=a.chunked_prefill_size,
            lora_rank=a.lora_rank,
            lora_alpha=float(a.lora_alpha),
            max_cache_depth=a.max_cache_depth,
            skip_lora=self.skip_lora,
            isa=isa,
            format=fmt,
            group_size=self.group_size,
            backward_weights=bwd,
            workspace=workspace,
            cache_pool=cache_pool,
            layer_idx=self.layer_idx,
        )

    def _needs_lora(self) -> bool:
        return not self.skip_lora

    @property
    def isa(self) -> str:
        """The kernel path this layer runs (KT_ISA spelling)."""
        return self._layer.isa

    @property
    def weight_format(self) -> str:
        """How the frozen base weights are held: 'bf16', 'int8', 'int4', 'int4_asym', 'int4_group_sym' or
        'int4_group_asym' (kt's ExpertFormat names)."""
        return self._layer.format

    def memory_bytes(self) -> dict:
        """Bytes held: forward base weights, transposed backward weights (a shared copy is the same object
        for every layer), cached activations this layer owns (entries kept for reuse; 0 with
        share_cache_pool), the shared cache pool (0 without one; the same object for every layer sharing
        it), and the shared workspace. A model's total counts each shared object once."""
        return {
            "weights": self._layer.weight_bytes,
            "backward_weights": self._layer.backward_weight_bytes,
            "cache": self._layer.cache_bytes,
            "cache_pool": self._layer.cache_pool_bytes,
            "workspace": self._layer.workspace_bytes,
        }
