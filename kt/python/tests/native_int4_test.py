"""Methods RAWINT4 and GPTQ_INT4 (native int4 checkpoints read as stored) on the kernel path the process has
(KT_ISA caps it: the AMX host runs this under each path), against a float64 MoE over the checkpoints'
weights decoded in numpy from the formats' documented layouts, within the bound of native_int4_reference.py
(int8 activation quantization and bf16 rounding propagated; kt's weights are the checkpoint's exactly).
tests_integration/test_native_int4.py makes the same comparison against compressed-tensors' own decoder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import testdata
from kt_kernel import KTMoEWrapper
from moe_reference import wrapper_args
from native_int4_reference import gptq_dequantize, rawint4_dequantize, reference_and_bound
from safetensors_np import SafeTensorsFile

PROJ = ("gate_proj", "up_proj", "down_proj")


def raw(st, name, dtype):
    entry = st.header[name]
    begin, end = entry["data_offsets"]
    return np.frombuffer(st._data[begin:end].tobytes(), dtype=dtype).reshape(entry["shape"])


def decoded(name, layer, E):
    st = SafeTensorsFile(testdata.path(name) + "/model.safetensors")
    out = {}
    for e in range(E):
        base = f"model.layers.{layer}.mlp.experts.{e}."
        if name.endswith("_rawint4"):
            out[e] = [rawint4_dequantize(raw(st, base + p + ".weight_packed", np.int32),
                                         raw(st, base + p + ".weight_scale", np.int16), 32) for p in PROJ]
        else:
            out[e] = [gptq_dequantize(*(raw(st, base + p + "." + t, d) for t, d in (
                ("qweight", np.int32), ("qzeros", np.int32), ("scales", np.float16), ("g_idx", np.int32))))
                      for p in PROJ]
    return out


@pytest.mark.parametrize("name,method,G,tp", [("kimi_k2_rawint4", "RAWINT4", 32, 1), ("kimi_k2_rawint4", "RAWINT4", 32, 2),
                                           ("qwen3_moe_gptq", "GPTQ_INT4", 128, 1)])
def test_native_int4_matches_float_reference(name, method, G, tp):
    # tp = 2: threadpool_count 2, the layer split along I into two parts (each loaded from the same folder).
    ref = testdata.reference(name)
    layer = int(ref["layer"])
    E, k, H, I = testdata.shape(name)
    moe = KTMoEWrapper(**wrapper_args(E, k, H, I, layer_idx=layer, weight_path=testdata.path(name),
                                      chunked_prefill_size=max(testdata.TOKENS), method=method,
                                      threadpool_count=tp))
    assert moe.weight_format == "int4_group_sym" and moe.group_size == G
    moe.load_weights(None)
    weights = decoded(name, layer, E)
    for T in testdata.TOKENS:
        x, ids, w, routed = testdata.inputs(ref, T)
        out = moe.forward(x, ids, w, None).float().numpy()
        want, bound, _ = reference_and_bound(weights, x.double().numpy(), ids.numpy(), w.double().numpy(), G)
        # The decoders are right: transformers' float32 output over the fixture's dequantized weights.
        assert np.abs(want - routed.double().numpy()).max() <= 1e-5 * np.abs(want).max(), (name, T)
        err = np.abs(out - want)
        worst = int(np.argmax(err / bound))
        print(f"{name} T={T} isa={moe.isa}: max|err| {err.max():.3g}, bound max {bound.max():.3g}, "
              f"worst err/bound {err.flat[worst] / bound.flat[worst]:.3f}")
        assert (err <= bound).all(), (name, T, moe.isa, worst, err.flat[worst], bound.flat[worst])
        assert bound.max() < 0.1 * np.abs(want).max()


def test_group_size_comes_from_the_checkpoint():
    # group_size=128 is asked for, the RAWINT4 checkpoint's groups are 32: the layer holds the checkpoint's.
    name = "kimi_k2_rawint4"
    E, k, H, I = testdata.shape(name)
    moe = KTMoEWrapper(**wrapper_args(E, k, H, I, layer_idx=1, weight_path=testdata.path(name), method="RAWINT4",
                                      group_size=128))
    assert moe.group_size == 32
    # Without weight_path, RAWINT4 quantizes bf16 tensors itself at group_size (AMXINT4_KGroup's format).
    moe = KTMoEWrapper(**wrapper_args(E, k, H, I, method="RAWINT4", group_size=64))
    assert moe.group_size == 64 and moe.weight_format == "int4_group_sym"


@pytest.mark.parametrize("as_bytes,tp", [(False, 1), (True, 1), (False, 2)])
def test_rawint4_from_the_checkpoints_tensors_equals_the_folder_load(as_bytes, tp):
    # load_weights_from_tensors with weight_packed (int32, or its uint8 bytes) and the bf16 weight_scale gives
    # the layer load_weights gives, bit for bit; with a physical -> logical map, that permutation of it.
    name, layer = "kimi_k2_rawint4", 1
    ref = testdata.reference(name)
    E, k, H, I = testdata.shape(name)
    st = SafeTensorsFile(testdata.path(name) + "/model.safetensors")
    args = wrapper_args(E, k, H, I, layer_idx=layer, weight_path=testdata.path(name), method="RAWINT4",
                        chunked_prefill_size=max(testdata.TOKENS), threadpool_count=tp)
    from_folder = KTMoEWrapper(**args)
    from_folder.load_weights(None)
    from_tensors = KTMoEWrapper(**args)

    def stacked(p, part, dtype):
        return torch.from_numpy(np.stack([raw(st, f"model.layers.{layer}.mlp.experts.{e}.{p}.{part}", dtype)
                                          for e in range(E)]).copy())

    packed = [stacked(p, "weight_packed", np.int32) for p in PROJ]
    if as_bytes:
        packed = [t.view(torch.uint8) for t in packed]
    scales = [stacked(p, "weight_scale", np.int16).view(torch.bfloat16) for p in PROJ]
    perm = torch.tensor([2, 0, 3, 1], dtype=torch.int64)
    from_tensors.load_weights_from_tensors(*packed, perm, *scales)
    from_folder_perm = KTMoEWrapper(**args)
    from_folder_perm.load_weights(perm)
    x, ids, w, _ = testdata.inputs(ref, 33)
    assert torch.equal(from_tensors.forward(x, ids, w, None).view(torch.int16),
                       from_folder_perm.forward(x, ids, w, None).view(torch.int16))
    from_tensors.load_weights_from_tensors(*packed, None, *scales)
    assert torch.equal(from_tensors.forward(x, ids, w, None).view(torch.int16),
                       from_folder.forward(x, ids, w, None).view(torch.int16))
    # Wrong dtype / shape of a scale: named, with what was expected.
    with pytest.raises(TypeError, match=r"down_scale must have dtype torch.bfloat16, got torch.float32"):
        from_tensors.load_weights_from_tensors(*packed, None, scales[0], scales[1], scales[2].float())
    with pytest.raises(ValueError, match=r"gate_scale must have shape \[E, I, H/G\] \(G = 32\) = \[4, 64, 4\]"):
        from_tensors.load_weights_from_tensors(*packed, None, scales[0][:, :, :2].contiguous(), *scales[1:])
    with pytest.raises(ValueError, match=r"up_scale is required with packed weights"):
        from_tensors.load_weights_from_tensors(*packed, None, scales[0], None, scales[2])
