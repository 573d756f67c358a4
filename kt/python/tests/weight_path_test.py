"""KTMoEWrapper(weight_path=...).load_weights(map) on the test checkpoints (testdata/hf), read directly and after
``kt convert``, against transformers' outputs and against load_weights_from_tensors.

Tolerances: BF16 against transformers' routed_T is max|err|/max|ref| <= moe_reference.TRANSFORMERS_TOL (the
same bound as hf_fixtures_test: transformers rounds each step of the bf16 model to bf16, kt rounds h and the
output).
Integer methods quantize, so they are compared with load_weights_from_tensors of the same weights, which
quantizes with the same code: the outputs must be bit-identical (any difference means the reader handed the
kernels other weights, or another expert).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from kt_kernel import KTMoEWrapper
from moe_reference import TRANSFORMERS_TOL, relative_error, wrapper_args
import testdata

ARCHS = ("qwen3_moe", "mixtral")
TOKENS = testdata.TOKENS
# Every implemented method; the group ones at group_size 128 (the default of both kt convert and the
# wrapper), which divides these checkpoints' H = I = 128.
METHODS = ("BF16", "AMXINT8", "MOE_INT8", "AMXINT4", "MOE_INT4", "AMXINT4_1", "AMXINT4_KGroup",
           "AMXINT4_1KGroup", "MXFP4", "MXFP8")


kt_binary = testdata.kt_binary


_CONVERTED = {}
_TMP = tempfile.mkdtemp(prefix="kt_wp_")
atexit.register(shutil.rmtree, _TMP, True)


def converted(arch: str, method: str) -> str:
    """`kt convert` of a fixture, once per (arch, method) per test process."""
    key = (arch, method)
    if key not in _CONVERTED:
        out = os.path.join(_TMP, f"{arch}_{method}")
        src = testdata.path(arch)
        r = subprocess.run([kt_binary(), "convert", "--input", src, "--output", out, "--method", method,
                            "--threads", "2"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "kt convert: done" in r.stderr
        _CONVERTED[key] = out
    return _CONVERTED[key]


shape = testdata.shape


def make(arch: str, method: str, weight_path, **kw):
    E, k, H, I = shape(arch)
    ref = testdata.reference(arch)
    args = wrapper_args(E, k, H, I, layer_idx=int(ref["layer"]), weight_path=weight_path,
                        chunked_prefill_size=max(TOKENS), method=method)
    args.update(kw)
    return KTMoEWrapper(**args)


def stacked(arch: str):
    """gate/up [E, I, H], down [E, H, I] of the reference layer, read independently (numpy reader)."""
    return testdata.stacked_experts(arch, int(testdata.reference(arch)["layer"]))


def inputs(arch: str, T: int):
    return testdata.inputs(testdata.reference(arch), T)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("source", ["hf", "converted"])
def test_load_weights_matches(arch, method, source):
    path = testdata.path(arch) if source == "hf" else converted(arch, method)
    moe = make(arch, method, path)
    moe.load_weights(None)
    assert moe.last_load_stats["converted"] == (source == "converted")
    baseline = make(arch, method, None)
    baseline.load_weights_from_tensors(*stacked(arch), None)
    for T in TOKENS:
        x, ids, w, expected = inputs(arch, T)
        out = moe.forward(x, ids, w, None)
        assert torch.equal(out, baseline.forward(x, ids, w, None)), f"{arch} {method} {source} T={T}"
        if method == "BF16":
            err = relative_error(out, expected)
            assert err <= TRANSFORMERS_TOL, f"{arch} {source} T={T}: {err:.3e}"


@pytest.mark.parametrize("source", ["hf", "converted"])
def test_physical_to_logical_map(source):
    """Slot i holds logical expert map[i]: a permuted load, with the ids mapped to slots, gives the identity
    load's output (up to the order of the fp32 sum over a token's k experts, which follows the slots: at most
    a bf16 rounding step apart), while the unmapped ids give a different output; a map that replicates an
    expert equals load_weights_from_tensors with it exactly."""
    arch, method = "qwen3_moe", "AMXINT8"
    path = testdata.path(arch) if source == "hf" else converted(arch, method)
    E = shape(arch)[0]
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(3)).to(torch.int64)
    ident = make(arch, method, path)
    ident.load_weights(None)
    permuted = make(arch, method, path)
    permuted.load_weights(perm)
    slot_of = torch.empty(E, dtype=torch.int64)
    slot_of[perm] = torch.arange(E)
    x, ids, w, _ = inputs(arch, 33)
    want = ident.forward(x, ids, w, None).float()
    got = permuted.forward(x, slot_of[ids].contiguous(), w, None).float()
    # Each side is one fp32 sum of k products rounded to bf16 once; summing in another order moves the fp32
    # value by a few fp32 ulps, which can flip the bf16 rounding: one bf16 step (2^-8 relative) at most.
    step = want.abs() * 2.0**-8 + 1e-6
    assert torch.all((got - want).abs() <= step), (got - want).abs().max()
    wrong = permuted.forward(x, ids, w, None).float()
    assert (wrong - want).abs().max() > 100 * step.max()
    replicated = torch.tensor([(3 * i) % 5 for i in range(E)], dtype=torch.int64)
    a = make(arch, method, path)
    a.load_weights(replicated)
    b = make(arch, method, None)
    b.load_weights_from_tensors(*stacked(arch), replicated)
    assert torch.equal(a.forward(x, ids, w, None), b.forward(x, ids, w, None))


def test_fp8_fixture_loads_only_with_method_fp8():
    path = testdata.path("deepseek_v3_fp8")
    E, k, H, I = testdata.shape("deepseek_v3_fp8")
    moe = KTMoEWrapper(
        **wrapper_args(E, k, H, I, layer_idx=1, weight_path=path, chunked_prefill_size=8, method="BF16")
    )
    with pytest.raises(ValueError, match="load it with method FP8"):
        moe.load_weights(None)
    assert not moe.weights_loaded
    fp8 = KTMoEWrapper(
        **wrapper_args(E, k, H, I, layer_idx=1, weight_path=path, chunked_prefill_size=8, method="FP8")
    )
    fp8.load_weights(None)
    assert fp8.weights_loaded and fp8.weight_format == "fp8_block"
    # Block scales are not per-channel ones: FP8_PERCHANNEL names the method that reads this folder.
    per_channel = KTMoEWrapper(
        **wrapper_args(E, k, H, I, layer_idx=1, weight_path=path, chunked_prefill_size=8, method="FP8_PERCHANNEL")
    )
    with pytest.raises(ValueError, match=r"load it with method FP8 \(its scales are per 128 x 128 block\)"):
        per_channel.load_weights(None)
    assert not per_channel.weights_loaded


def test_fp8_perchannel_converted_folder_loads_as_the_checkpoint():
    # kt convert --method FP8_PERCHANNEL copies the per-channel FP8 folder as stored (kt-fp8-block128-v1, each
    # row's scale per block): loading it gives the layer loading the checkpoint gives, bit for bit.
    name = "glm4_moe_channel_fp8"
    from_hf = make(name, "FP8_PERCHANNEL", testdata.path(name))
    from_hf.load_weights(None)
    from_converted = make(name, "FP8_PERCHANNEL", converted(name, "FP8_PERCHANNEL"))
    from_converted.load_weights(None)
    assert from_converted.last_load_stats["converted"]
    for T in TOKENS:
        x, ids, w, _ = inputs(name, T)
        assert torch.equal(from_hf.forward(x, ids, w, None), from_converted.forward(x, ids, w, None))


def test_bad_folders_give_clear_errors(tmp_path):
    arch = "qwen3_moe"
    src = testdata.path(arch)
    # Shape mismatch with the config, naming the key and both values.
    moe = make(arch, "BF16", src, hidden_size=64)
    with pytest.raises(ValueError, match=r"config.json: hidden_size = 128, but the layer was created with hidden_size = 64"):
        moe.load_weights(None)
    # A layer the model does not have.
    moe = make(arch, "BF16", src, layer_idx=7)
    with pytest.raises(ValueError, match="layer 7 is not an MoE layer"):
        moe.load_weights(None)
    # A converted folder of another layout.
    moe = make(arch, "BF16", converted(arch, "AMXINT8"))
    with pytest.raises(ValueError, match=r"holds layout \"kt-int8-channel-v1\" .* method BF16 needs \"kt-bf16-v1\""):
        moe.load_weights(None)
    # A corrupt layer file: the checksum names the byte range; the previous good load stays in use, unmixed.
    bad = str(tmp_path / "bad")
    shutil.copytree(converted(arch, "AMXINT8"), bad)
    moe = make(arch, "AMXINT8", bad)
    moe.load_weights(None)
    assert moe.weights_loaded
    layer_file = os.path.join(bad, "layer_0000.safetensors")
    testdata.flip_byte(layer_file)
    with pytest.raises(OSError, match=r"layer_0000.safetensors: checksum mismatch in bytes \[0, "):
        moe.load_weights(None)
    assert moe.weights_loaded
    # Truncated.
    with open(layer_file, "r+b") as f:
        f.truncate(os.path.getsize(layer_file) - 10)
    with pytest.raises((OSError, ValueError), match="layer_0000.safetensors"):
        moe.load_weights(None)
    # Not a weight folder.
    moe = make(arch, "BF16", str(tmp_path))
    with pytest.raises(OSError, match="not a weight folder"):
        moe.load_weights(None)
    # No weight_path at all.
    with pytest.raises(ValueError, match="weight_path is None"):
        make(arch, "BF16", None).load_weights(None)
    # A bad map.
    with pytest.raises(ValueError, match="physical_to_logical_map_cpu"):
        make(arch, "BF16", src).load_weights(torch.full((8,), 8, dtype=torch.int64))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
