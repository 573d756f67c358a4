"""Issue 14's bad inputs against the Python API, on small synthetic layers and folders made here:

- NaN / Inf in one token's hidden_states give a non-finite row for that token on every method and every
  kernel path this CPU runs (each path in a child process with KT_ISA set, as isa_env_test does), the other
  tokens bit for bit as with a finite value there; PyTorch's bf16 model gives a non-finite row too.
- gpu_experts_mask is checked at assignment and at every forward (resize_, wrong dtype, wrong length).
- A failed reload (checksum mismatch, NaN weight, missing folder) leaves the previous weights in use.
- load_weights racing forward on another thread: every forward succeeds with the old or the new weights.
- weight_path takes pathlib.Path; a missing path is FileNotFoundError with errno; qlen == 0.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import threading

import pytest
import torch

import testdata
from kt_kernel import KTMoEWrapper, _native
from moe_reference import random_experts, random_routing, reference_moe, wrapper_args

# The methods of issue 14's report and the rest of the integer family; group methods use G = 32.
METHODS = [
    "BF16",
    "AMXINT8",
    "MOE_INT8",
    "AMXINT4",
    "MOE_INT4",
    "AMXINT4_1",
    "AMXINT4_KGroup",
    "AMXINT4_1KGroup",
    "MOE_INT4_1KGroup",
]
E, K, H, I = 6, 2, 64, 32

_TMP = tempfile.mkdtemp(prefix="kt_robust_")


def make(method: str, **kw):
    args = wrapper_args(E, K, H, I, method=method)
    if "KGroup" in method:
        args["group_size"] = 32
    args.update(kw)
    return KTMoEWrapper(**args)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


# -- NaN / Inf -------------------------------------------------------------------------------------------

_NAN_CHILD = r"""
import math, sys, torch
from kt_kernel import KTMoEWrapper, _native
from moe_reference import random_experts, random_routing, reference_moe, wrapper_args
E, K, H, I = 6, 2, 64, 32
methods = sys.argv[1].split(",")
gate, up, down = random_experts(E, H, I, seed=5)
x, ids, w = random_routing(5, H, E, K, seed=6)
bad_token = 2
cases = [("one NaN", [7], float("nan")), ("all NaN", list(range(H)), float("nan")),
         ("+Inf", [H - 1], float("inf")), ("-Inf", [3], float("-inf"))]
for method in methods:
    args = wrapper_args(E, K, H, I, method=method)
    if "KGroup" in method:
        args["group_size"] = 32
    moe = KTMoEWrapper(**args)
    moe.load_weights_from_tensors(gate, up, down, None)
    clean = moe.forward(x, ids, w, None)
    for what, cols, value in cases:
        xb = x.clone()
        xb[bad_token, cols] = value
        out = moe.forward(xb, ids, w, None)
        row = out[bad_token].float()
        assert not torch.isfinite(row).any(), f"{method} {_native.ISA} {what}: finite values {row}"
        others = [t for t in range(5) if t != bad_token]
        assert torch.equal(out[others].view(torch.int16), clean[others].view(torch.int16)), (
            f"{method} {_native.ISA} {what}: other tokens changed")
        ref = reference_moe(xb, ids, w, gate, up, down)
        assert not torch.isfinite(ref[bad_token]).any(), f"torch reference finite for {what}"
print("OK", _native.ISA, len(methods))
"""


def supported_paths():
    return [p for p in ("scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx") if _native._kt.isa_supported(p)]


@pytest.mark.parametrize("path", ["scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"])
def test_non_finite_input_gives_non_finite_output_for_that_token(path):
    if path not in supported_paths():
        pytest.skip(f"{path} is not supported by this CPU ({_native._kt.cpu_features()})")
    env = dict(os.environ, KT_ISA=path)
    r = subprocess.run(
        [sys.executable, "-c", _NAN_CHILD, ",".join(METHODS)], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"OK {path} {len(METHODS)}", r.stdout


# -- gpu_experts_mask ------------------------------------------------------------------------------------


def test_mask_checked_at_assignment_and_every_forward():
    gate, up, down = random_experts(E, H, I, seed=1)
    x, ids, w = random_routing(4, H, E, K, seed=2)
    ids[:, 0] = 1  # every token uses expert 1, the one masked below
    mask = torch.zeros(E, dtype=torch.bool)
    mask[1] = True
    moe = make("AMXINT8", gpu_experts_mask=mask)
    moe.load_weights_from_tensors(gate, up, down, None)
    masked = moe.forward(x, ids, w, None)
    # Flipping bits in place still takes effect (the tensor is kept).
    mask[1] = False
    unmasked = moe.forward(x, ids, w, None)
    assert not torch.equal(bits(masked), bits(unmasked))
    # Shrunk in place: refused at the next forward, naming the argument and the expected shape.
    mask.resize_(2)
    with pytest.raises(ValueError, match=r"gpu_experts_mask must have shape \[num_experts\] = \[6\], got \[2\]"):
        moe.forward(x, ids, w, None)
    # Replaced by a tensor of the wrong length or dtype: refused at assignment; the old mask stays.
    with pytest.raises(ValueError, match=r"gpu_experts_mask must have shape \[num_experts\] = \[6\], got \[8\]"):
        moe.gpu_experts_mask = torch.zeros(8, dtype=torch.bool)
    with pytest.raises(TypeError, match="gpu_experts_mask must have dtype torch.bool, got torch.float32"):
        moe.gpu_experts_mask = torch.zeros(3)
    with pytest.raises(ValueError, match="gpu_experts_mask must be contiguous"):
        moe.gpu_experts_mask = torch.zeros(2 * E, dtype=torch.bool)[::2]
    # A valid replacement works and equals the masked result; None means all experts on the CPU.
    m2 = torch.zeros(E, dtype=torch.bool)
    m2[1] = True
    moe.gpu_experts_mask = m2
    assert torch.equal(bits(moe.forward(x, ids, w, None)), bits(masked))
    moe.gpu_experts_mask = None
    assert torch.equal(bits(moe.forward(x, ids, w, None)), bits(unmasked))
    # Bypassing the setter (the private attribute) is still caught at forward.
    moe._gpu_experts_mask = torch.zeros(3)
    with pytest.raises(TypeError, match="gpu_experts_mask must have dtype torch.bool"):
        moe.forward(x, ids, w, None)
    # The constructor checks it too.
    with pytest.raises(ValueError, match=r"gpu_experts_mask must have shape"):
        make("BF16", gpu_experts_mask=torch.zeros(E + 1, dtype=torch.bool))


# -- weight folders made here ------------------------------------------------------------------------------


def write_safetensors(path: str, tensors: dict) -> None:
    """A minimal safetensors writer (bf16 tensors only): 8-byte header size, JSON header, data."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        raw = t.view(torch.int16).numpy().tobytes()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def write_hf(folder: str, gate, up, down) -> str:
    """A one-layer Qwen3-MoE Hugging Face folder holding these experts as layer 0."""
    os.makedirs(folder, exist_ok=True)
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": H,
        "num_hidden_layers": 1,
        "num_experts": E,
        "num_experts_per_tok": K,
        "moe_intermediate_size": I,
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    tensors = {}
    for e in range(E):
        for name, t in (("gate_proj", gate[e]), ("up_proj", up[e]), ("down_proj", down[e])):
            tensors[f"model.layers.0.mlp.experts.{e}.{name}.weight"] = t
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    return folder


kt_binary = testdata.kt_binary


def test_failed_reload_keeps_the_previous_weights(tmp_path):
    gate, up, down = random_experts(E, H, I, seed=11)
    x, ids, w = random_routing(5, H, E, K, seed=12)
    hf = write_hf(str(tmp_path / "hf"), gate, up, down)
    out = str(tmp_path / "converted")
    r = subprocess.run([kt_binary(), "convert", "--input", hf, "--output", out, "--method", "AMXINT8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr

    moe = make("AMXINT8", weight_path=pathlib.Path(out))  # an os.PathLike is accepted
    moe.load_weights(None)
    good = moe.forward(x, ids, w, None)
    # The same weights from tensors give the same result (an independent check that the load is right).
    ref = make("AMXINT8")
    ref.load_weights_from_tensors(gate, up, down, None)
    assert torch.equal(bits(ref.forward(x, ids, w, None)), bits(good))

    # 1. The folder is corrupted (one flipped byte): checksum mismatch; the loaded weights stay in use.
    layer_file = os.path.join(out, "layer_0000.safetensors")
    testdata.flip_byte(layer_file)
    with pytest.raises(OSError, match=r"layer_0000.safetensors: checksum mismatch in bytes \[0, "):
        moe.load_weights(None)
    assert moe.weights_loaded
    assert torch.equal(bits(moe.forward(x, ids, w, None)), bits(good))

    # 2. An HF folder with a NaN weight (int8 quantizes at load and refuses it): same.
    bad_gate = gate.clone()
    bad_gate[3, 4, 5] = float("nan")
    nan_hf = write_hf(str(tmp_path / "nan_hf"), bad_gate, up, down)
    moe.weight_path = nan_hf
    with pytest.raises(ValueError, match=r"expert 3 gate"):
        moe.load_weights(None)
    assert torch.equal(bits(moe.forward(x, ids, w, None)), bits(good))
    with pytest.raises(ValueError, match="gate"):
        moe.load_weights_from_tensors(bad_gate, up, down, None)
    assert torch.equal(bits(moe.forward(x, ids, w, None)), bits(good))

    # 3. The folder is gone: FileNotFoundError with errno and filename, weights kept.
    missing = str(tmp_path / "missing")
    moe.weight_path = missing
    with pytest.raises(FileNotFoundError, match="weight_path does not exist") as info:
        moe.load_weights(None)
    assert info.value.errno == errno.ENOENT and info.value.filename == missing
    moe.weight_path = layer_file
    with pytest.raises(NotADirectoryError) as info:
        moe.load_weights(None)
    assert info.value.errno == errno.ENOTDIR
    assert torch.equal(bits(moe.forward(x, ids, w, None)), bits(good))

    # 4. A good reload of other weights replaces them.
    gate2, up2, down2 = random_experts(E, H, I, seed=13)
    moe.weight_path = write_hf(str(tmp_path / "hf2"), gate2, up2, down2)
    moe.load_weights(None)
    ref.load_weights_from_tensors(gate2, up2, down2, None)
    assert torch.equal(bits(moe.forward(x, ids, w, None)), bits(ref.forward(x, ids, w, None)))


def test_kt_convert_command_line_errors(tmp_path):
    """The CLI's own error paths: one 'kt convert:' prefix, a locked output folder, ignored flags refused,
    and an earlier conversion of another layout never silently replaced."""
    import fcntl

    gate, up, down = random_experts(E, H, I, seed=41)
    hf = write_hf(str(tmp_path / "hf"), gate, up, down)
    out = str(tmp_path / "out")

    def convert(*args):
        return subprocess.run([kt_binary(), "convert", "--input", hf, *args], capture_output=True, text=True,
                              timeout=120)

    r = convert("--output", hf, "--method", "BF16")
    assert r.returncode == 1
    assert r.stderr == f"kt convert: --output {hf} is the input folder; choose another folder\n", r.stderr
    r = convert("--output", out, "--method", "AMXINT8", "--group-size", "64")
    assert r.returncode == 1 and "kt convert: --group-size 64: method AMXINT8 has no groups" in r.stderr, r.stderr
    assert not os.path.exists(out)
    os.makedirs(out)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = convert("--output", out, "--method", "AMXINT8")
        assert r.returncode == 1 and "another process holds its lock" in r.stderr, r.stderr
    finally:
        os.close(fd)
    r = convert("--output", out, "--method", "AMXINT8")
    assert r.returncode == 0, r.stderr
    r = convert("--output", out, "--method", "AMXINT4")
    assert r.returncode == 1 and "holds a conversion for method AMXINT8" in r.stderr, r.stderr


def test_weight_path_type_is_checked():
    with pytest.raises(TypeError, match="weight_path must be a str, an os.PathLike"):
        make("BF16", weight_path=42)


def test_load_racing_forward_never_sees_an_unloaded_layer():
    gate_a, up_a, down_a = random_experts(E, H, I, seed=21)
    gate_b, up_b, down_b = random_experts(E, H, I, seed=22)
    x, ids, w = random_routing(8, H, E, K, seed=23)
    moe = make("AMXINT8")
    moe.load_weights_from_tensors(gate_b, up_b, down_b, None)
    want_b = bits(moe.forward(x, ids, w, None)).clone()
    moe.load_weights_from_tensors(gate_a, up_a, down_a, None)
    want_a = bits(moe.forward(x, ids, w, None)).clone()
    errors, stop = [], threading.Event()

    def reload():
        try:
            for i in range(30):
                g, u, d = (gate_a, up_a, down_a) if i % 2 else (gate_b, up_b, down_b)
                moe.load_weights_from_tensors(g, u, d, None)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    t = threading.Thread(target=reload)
    t.start()
    forwards = 0
    while not stop.is_set() or forwards == 0:
        got = bits(moe.forward(x, ids, w, None))
        assert torch.equal(got, want_a) or torch.equal(got, want_b)
        forwards += 1
    t.join()
    assert not errors, errors
    print(f"{forwards} forwards during 30 reloads")


def test_qlen_zero_gives_an_empty_output():
    gate, up, down = random_experts(E, H, I, seed=31)
    moe = make("BF16")
    moe.load_weights_from_tensors(gate, up, down, None)
    out = moe.forward(torch.empty(0, H, dtype=torch.bfloat16), torch.empty(0, K, dtype=torch.int64),
                      torch.empty(0, K, dtype=torch.float32), None)
    assert out.shape == (0, H) and out.dtype == torch.bfloat16


if __name__ == "__main__":
    code = pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider"])
    shutil.rmtree(_TMP, True)
    sys.exit(code)
