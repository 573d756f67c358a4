"""KTMoEWrapper's public API: mode/method validation, unimplemented methods, argument errors."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

import kt_kernel
from kt_kernel import INFERENCE_METHODS, KT_INFERENCE_EXTENSIONS, SFT_METHODS, KTMoEWrapper
from moe_reference import wrapper_args

E, K, H, I = 4, 2, 64, 32

BASE = wrapper_args(E, K, H, I, cpuinfer_threads=1, chunked_prefill_size=8)


def make(**overrides):
    kwargs = dict(BASE, method="BF16")
    kwargs.update(overrides)
    return KTMoEWrapper(**kwargs)


def loaded():
    moe = make()
    gate = torch.zeros(E, I, H, dtype=torch.bfloat16)
    down = torch.zeros(E, H, I, dtype=torch.bfloat16)
    moe.load_weights_from_tensors(gate, gate.clone(), down, None)
    return moe


def inputs(qlen=3, k=K):
    return (
        torch.zeros(qlen, H, dtype=torch.bfloat16),
        torch.zeros(qlen, k, dtype=torch.int64),
        torch.full((qlen, k), 0.5, dtype=torch.float32),
    )


def test_signature_matches_the_original():
    params = inspect.signature(KTMoEWrapper.__new__).parameters
    assert list(params) == [
        "cls", "layer_idx", "num_experts", "num_experts_per_tok", "hidden_size", "moe_intermediate_size",
        "gpu_experts_mask", "cpuinfer_threads", "threadpool_count", "weight_path", "chunked_prefill_size",
        "cpu_save", "max_deferred_experts_per_token", "method", "numa_nodes", "mode", "num_gpu_experts",
        "lora_rank", "lora_alpha", "max_cache_depth", "group_size", "zero_point",
        # After the original's parameters, in their order, so positional calls are unchanged: the SFT
        # option the original sets from its KTConfig (kt_share_cache_pool) on its SFT wrapper.
        "share_cache_pool",
        # The original's activation extras (its MXFP4 / MXFP8 methods take them), after kt's SFT option.
        "swiglu_limit", "swiglu_alpha",
    ]  # fmt: skip
    defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    assert defaults == dict(
        cpu_save=False, max_deferred_experts_per_token=None, method="AMXINT4", numa_nodes=None,
        mode="inference", num_gpu_experts=0, lora_rank=16, lora_alpha=32.0, max_cache_depth=1,
        group_size=128, zero_point=True, share_cache_pool=False, swiglu_limit=0.0, swiglu_alpha=0.0,
    )  # fmt: skip
    assert len(INFERENCE_METHODS) == 10 and "BF16" in INFERENCE_METHODS
    assert len(SFT_METHODS) == 12 and "AMXBF16_SFT_SkipLoRA" in SFT_METHODS
    assert isinstance(kt_kernel.__version__, str)


def test_unknown_mode():
    with pytest.raises(ValueError, match=r"Unknown mode: 'train'\. Supported modes: 'inference', 'sft'"):
        make(mode="train")


def test_method_not_valid_for_mode():
    with pytest.raises(ValueError, match=r"Method 'AMXBF16_SFT' not supported for inference mode\."):
        make(method="AMXBF16_SFT")
    with pytest.raises(ValueError, match=r"Method 'BF16' not supported for SFT mode\."):
        make(method="BF16", mode="sft")
    with pytest.raises(ValueError, match=r"Method 'NOPE' not supported for inference mode"):
        make(method="NOPE")


def test_every_inference_method_is_implemented():
    # The original's methods and kt's extensions all have a backend (none raises NotImplementedError).
    from kt_kernel.experts import _INFERENCE_BACKENDS

    assert INFERENCE_METHODS | KT_INFERENCE_EXTENSIONS <= set(_INFERENCE_BACKENDS)


def test_swiglu_arguments_only_for_the_mx_methods():
    # The original's rule: swiglu_limit / swiglu_alpha go with MXFP4 / MXFP8; any other method (and SFT) is
    # told to pass 0, naming the argument; a negative or non-finite value is refused by name.
    with pytest.raises(ValueError, match=r"swiglu_limit=7\.0 is only supported by methods MXFP4, MXFP8"):
        make(method="BF16", swiglu_limit=7.0)
    with pytest.raises(ValueError, match=r"swiglu_alpha=1\.702 is only supported by methods MXFP4, MXFP8"):
        make(method="AMXINT8", swiglu_alpha=1.702)
    with pytest.raises(ValueError, match="SFT computes silu"):
        make(method="AMXBF16_SFT", mode="sft", swiglu_limit=7.0)
    with pytest.raises(ValueError, match="swiglu_limit must be a finite number >= 0"):
        make(method="MXFP4", swiglu_limit=-1.0)
    with pytest.raises(TypeError, match="swiglu_alpha must be a float"):
        make(method="MXFP8", swiglu_alpha="1.7")
    assert make(method="MXFP4", swiglu_limit=7.0, swiglu_alpha=1.702).weight_format == "mxfp4"


def test_default_method_is_amxint4():
    # The original's default method, AMXINT4: int4 experts, never silently another format.
    moe = KTMoEWrapper(**dict(BASE))
    assert moe.method == "AMXINT4" and moe.weight_format == "int4"


_SFT_FORMATS = {
    "AMXBF16_SFT": "bf16",
    "AMXINT8_SFT": "int8",
    "AMXINT4_SFT": "int4",
    "AMXINT4_1_SFT": "int4_asym",
    "AMXINT4_KGroup_SFT": "int4_group_sym",
    "AMXINT4_1KGroup_SFT": "int4_group_asym",
}


@pytest.mark.parametrize("method", sorted(SFT_METHODS))
def test_sft_methods_build(method):
    # Every one of the twelve SFT methods builds (group_size 32 divides the test shape's H and I).
    moe = make(method=method, mode="sft", group_size=32)
    assert type(moe).__name__ == "AMXSFTMoEWrapper"
    assert moe.weight_format == _SFT_FORMATS[method.replace("_SkipLoRA", "")]
    assert moe.skip_lora == method.endswith("_SkipLoRA")


def test_unimplemented_backend_methods():
    moe = loaded()
    # load_weights reads weight_path (weight_path_test.py); without a weight_path it says what to pass.
    with pytest.raises(ValueError, match="weight_path is None"):
        moe.load_weights(None)
    x, ids, w = inputs()
    # The synchronous forward takes CPU tensors only; stream ordering is submit_forward/sync_forward's
    # (serving_test.py).
    with pytest.raises(NotImplementedError, match="cuda_stream"):
        moe.forward(x, ids, w, cuda_stream=object())


@pytest.mark.parametrize(
    "overrides, exc, name",
    [
        (dict(num_experts=0), ValueError, "num_experts"),
        (dict(num_experts=4.0), TypeError, "num_experts"),
        (dict(num_experts_per_tok=5), ValueError, "num_experts_per_tok"),
        (dict(hidden_size=-1), ValueError, "hidden_size"),
        (dict(moe_intermediate_size=True), TypeError, "moe_intermediate_size"),
        (dict(cpuinfer_threads=0), ValueError, "cpuinfer_threads"),
        (dict(chunked_prefill_size=0), ValueError, "chunked_prefill_size"),
        (dict(gpu_experts_mask=torch.zeros(E, dtype=torch.int32)), TypeError, "gpu_experts_mask"),
        (dict(gpu_experts_mask=torch.zeros(E + 1, dtype=torch.bool)), ValueError, "gpu_experts_mask"),
        (dict(gpu_experts_mask=[False] * E), TypeError, "gpu_experts_mask"),
        (dict(gpu_experts_mask=torch.zeros(2 * E, dtype=torch.bool)[::2]), ValueError, "gpu_experts_mask"),
        (dict(numa_nodes=[0, 1]), ValueError, "numa_nodes"),
    ],
)
def test_bad_constructor_arguments(overrides, exc, name):
    with pytest.raises(exc, match=name):
        make(**overrides)


def _weights():
    gate = torch.zeros(E, I, H, dtype=torch.bfloat16)
    return gate, gate.clone(), torch.zeros(E, H, I, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "index, bad, exc, message",
    [
        (0, torch.zeros(E, I, H, dtype=torch.float32), TypeError, r"gate_proj must have dtype torch\.bfloat16"),
        (1, torch.zeros(E, H, I, dtype=torch.bfloat16), ValueError, r"up_proj must have shape \[E, I, H\]"),
        (2, torch.zeros(E, I, H, dtype=torch.bfloat16), ValueError, r"down_proj must have shape \[E, H, I\]"),
        (2, torch.zeros(E, I, H, dtype=torch.bfloat16).transpose(1, 2), ValueError, "down_proj must be contiguous"),
        (0, torch.zeros(E, I, H).numpy(), TypeError, "gate_proj must be a torch.Tensor"),
        (1, torch.zeros(E, I, H, dtype=torch.bfloat16, device="meta"), ValueError, "up_proj must be a CPU tensor"),
        (3, torch.arange(E, dtype=torch.int32), TypeError, "physical_to_logical_map_cpu must have dtype"),
        (3, torch.arange(E + 1), ValueError, "physical_to_logical_map_cpu must have shape"),
        (3, torch.tensor([0, 1, 2, E]), ValueError, r"physical_to_logical_map_cpu entries must be in \[0, 4\)"),
        (3, torch.tensor([0, -1, 2, 3]), ValueError, "physical_to_logical_map_cpu entries"),
    ],
)  # fmt: skip
def test_bad_weights(index, bad, exc, message):
    args = list(_weights()) + [None]
    args[index] = bad
    with pytest.raises(exc, match=message):
        make().load_weights_from_tensors(*args)


def test_forward_before_loading():
    with pytest.raises(RuntimeError, match="before the expert weights were loaded"):
        make().forward(*inputs(), None)


@pytest.mark.parametrize(
    "index, bad, exc, message",
    [
        (0, torch.zeros(3, H, dtype=torch.float32), TypeError, r"hidden_states must have dtype torch\.bfloat16"),
        (0, torch.zeros(3, H + 1, dtype=torch.bfloat16), ValueError, "hidden_states must have shape"),
        (0, torch.zeros(H, 3, dtype=torch.bfloat16).t(), ValueError, "hidden_states must be contiguous"),
        (0, torch.zeros(3, 2, H, dtype=torch.bfloat16), ValueError, "hidden_states must have shape"),
        (0, "x", TypeError, "hidden_states must be a torch.Tensor"),
        (0, torch.zeros(3, H, dtype=torch.bfloat16, device="meta"), ValueError, "hidden_states must be a CPU tensor"),
        (1, torch.zeros(3, K, dtype=torch.int32), TypeError, r"topk_ids must have dtype torch\.int64"),
        (1, torch.zeros(4, K, dtype=torch.int64), ValueError, "topk_ids must have shape"),
        (1, torch.zeros(3, K + 1, dtype=torch.int64), ValueError, "topk_ids must have 1 <= k <="),
        (1, torch.zeros(K, 3, dtype=torch.int64).t(), ValueError, "topk_ids must be contiguous"),
        (2, torch.zeros(3, K, dtype=torch.bfloat16), TypeError, r"topk_weights must have dtype torch\.float32"),
        (2, torch.zeros(3, K + 1, dtype=torch.float32), ValueError, "topk_weights must have shape"),
        (2, torch.zeros(K, 3, dtype=torch.float32).t(), ValueError, "topk_weights must be contiguous"),
    ],
)  # fmt: skip
def test_bad_forward_inputs(index, bad, exc, message):
    args = list(inputs())
    args[index] = bad
    with pytest.raises(exc, match=message):
        loaded().forward(*args, None)


def test_qlen_above_chunked_prefill_size():
    with pytest.raises(ValueError, match=r"qlen=9 .*chunked_prefill_size=8.*chunking comes later"):
        loaded().forward(*inputs(qlen=9), None)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
