"""``kt convert`` from a GGUF checkpoint against the ``gguf`` package (PyPI), the independent oracle of ggml's
block formats and of llama.cpp's metadata key names.

Each case writes a one-layer ``qwen3moe`` GGUF with ``gguf.GGUFWriter``: the shape through the writer's own
``add_block_count`` / ``add_embedding_length`` / ``add_expert_count`` / ``add_expert_used_count`` /
``add_expert_feed_forward_length`` (so the keys are spelled as gguf-py spells them, not as kt does), the
expert-stacked tensors as test_gguf.py makes them (the 32-value and float types quantized by
``gguf.quants.quantize``, the K-quants random blocks with sane fp16 factors). The ``kt`` binary ($KT_BIN)
converts it to BF16; every expert matrix of the output must equal ``bf16(gguf.quants.dequantize(...))`` bit
for bit. No tolerance: gguf's numpy dequantizer evaluates ggml's formulas in float32 in ggml's order, as kt
does, and the bf16 rounding (torch's, nearest even) follows once in both.

A second check converts one case to AMXINT8 and loads the folder with ``KTMoEWrapper(method="AMXINT8")``
(load_weights takes it); its forward must agree with a float64 MoE over the int8 weights the folder holds
within test_gguf.py's per-element bound for int8 activations (one block per token), which a wrong matrix
would exceed by many sigma.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
safetensors_torch = pytest.importorskip("safetensors.torch")
from gguf import GGMLQuantizationType as T  # noqa: E402

from test_gguf import CASES, _blocks  # noqa: E402

E, H, I, TOPK = 4, 256, 512, 2


def _kt_bin():
    path = os.environ.get("KT_BIN")
    if not path or not os.path.exists(path):
        pytest.skip("KT_BIN (the kt binary) is not set; tools/test_sft_integration.sh sets it")
    return path


def _write(path, gate_up, down, seed=0):
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "qwen3moe")
    writer.add_block_count(1)
    writer.add_embedding_length(H)
    writer.add_expert_count(E)
    writer.add_expert_used_count(TOPK)
    writer.add_expert_feed_forward_length(I)
    weights = {}
    for proj, qtype, n, k in (("gate", gate_up, I, H), ("up", gate_up, I, H), ("down", down, H, I)):
        data = _blocks(qtype, E * n, k, rng)
        data = data.reshape(E, n, *data.shape[1:])
        writer.add_tensor(f"blk.0.ffn_{proj}_exps.weight", data, raw_dtype=qtype)
        weights[proj] = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(E, n, k)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def _convert(src, out, method):
    r = subprocess.run([_kt_bin(), "convert", f"--input={src}", f"--output={out}", f"--method={method}",
                        "--threads=2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize("gate_up,down", CASES, ids=[f"{a.name}-{b.name}" for a, b in CASES])
def test_bf16_equals_gguf_dequantize(tmp_path, gate_up, down):
    src = str(tmp_path / "model.gguf")
    weights = _write(src, gate_up, down)
    out = tmp_path / "out"
    _convert(src, out, "BF16")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (config["num_experts"], config["hidden_size"], config["moe_intermediate_size"]) == (E, H, I)
    tensors = safetensors_torch.load_file(str(out / "layer_0000.safetensors"))
    for proj in ("gate", "up", "down"):
        for e in range(E):
            got = tensors[f"experts.{e}.{proj}.weight"]
            want = torch.from_numpy(weights[proj][e]).to(torch.bfloat16)
            assert got.dtype == torch.bfloat16 and got.shape == want.shape
            diff = (got.view(torch.int16) != want.view(torch.int16)).nonzero()
            assert diff.numel() == 0, f"{proj} expert {e}: {diff.shape[0]} elements differ, first at {diff[0].tolist()}"


def test_amxint8_folder_loads_and_runs(tmp_path, monkeypatch):
    import kt_kernel
    import test_gguf
    from kt_kernel import KTMoEWrapper

    src = str(tmp_path / "model.gguf")
    _write(src, T.Q4_K, T.Q6_K)
    out = tmp_path / "out"
    _convert(src, out, "AMXINT8")
    tensors = safetensors_torch.load_file(str(out / "layer_0000.safetensors"))
    # The folder's weights: int8 per row times its scale (kt-int8-channel-v1), [E, N, K] per projection.
    w = {proj: np.stack([(tensors[f"experts.{e}.{proj}.qdata"].view(torch.int8).to(torch.float64) *
                          tensors[f"experts.{e}.{proj}.scales"].to(torch.float64)).numpy() for e in range(E)])
         for proj in ("gate", "up", "down")}

    moe = KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=TOPK, hidden_size=H,
                       moe_intermediate_size=I, gpu_experts_mask=None, cpuinfer_threads=2, threadpool_count=1,
                       weight_path=str(out), chunked_prefill_size=16, method="AMXINT8")
    moe.load_weights()
    # The bound is test_gguf's (docs/FORMATS.md "LLAMAFILE: error bound"): AMXINT8 quantizes x and h to int8
    # the same way with one block per token (H values for x, I for h), so its partner blocks are H and I.
    assert (test_gguf.E, test_gguf.H, test_gguf.I, test_gguf.TOPK) == (E, H, I, TOPK)
    monkeypatch.setitem(test_gguf.PARTNER, "x per token", H)
    monkeypatch.setitem(test_gguf.PARTNER, "h per token", I)
    for T_, seed in ((1, 3), (9, 4)):
        x, ids, topw = test_gguf._routing(T_, seed)
        y = moe.forward(x, ids, topw).to(torch.float64).numpy()
        ref, bound = test_gguf._reference_and_bound(w, x.to(torch.float64).numpy(), ids.numpy(),
                                                    topw.to(torch.float64).numpy(), "x per token", "h per token")
        err = np.abs(y - ref)
        used = float((err / bound).max())
        print(f"AMXINT8 from a Q4_K/Q6_K GGUF, T={T_} ({kt_kernel.__cpu_variant__}): max err {err.max():.3g}, "
              f"max|ref| {np.abs(ref).max():.3g}, bound used {used:.2f}")
        assert np.all(err <= bound), f"error above the bound ({used:.2f} of it)"
