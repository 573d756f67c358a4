"""KTMoEWrapper(method="BF16") on real Hugging Face MoE checkpoints against transformers' own outputs.

Fixtures (see <fixtures>/README.md): tiny random Qwen3-MoE and Mixtral models saved by transformers, with
``reference.npz`` holding, for the first MoE layer, inputs x_T, router choices ids_T/weights_T and the routed
experts' output routed_T as transformers computes it, for T = 1, 7, 33 tokens.

The fixture directory comes from the environment variable KT_FIXTURES (absolute path of shared/fixtures);
the test fails, never skips, when it is missing: pass --test_env=KT_FIXTURES=/abs/path/to/fixtures.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from kt_kernel import KTMoEWrapper
from moe_reference import REL_TOL, reference_moe, relative_error, wrapper_args
from safetensors_np import SafeTensorsFile

# Expert tensor names per architecture: (prefix format, gate, up, down).
ARCHS = {
    "qwen3_moe": ("model.layers.{layer}.mlp.experts.{e}.", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("model.layers.{layer}.block_sparse_moe.experts.{e}.", "w1", "w3", "w2"),
}
TOKENS = (1, 7, 33)


def fixtures_dir() -> str:
    path = os.environ.get("KT_FIXTURES", "")
    if not path:
        pytest.fail(
            "KT_FIXTURES is not set: run with --test_env=KT_FIXTURES=<absolute path of shared/fixtures>",
            pytrace=False,
        )
    if not os.path.isdir(os.path.join(path, "hf")):
        pytest.fail(f"KT_FIXTURES={path!r} has no hf/ directory (expected shared/fixtures)", pytrace=False)
    return path


def model_shape(config: dict):
    """(E, k, H, I) from a Hugging Face config.json."""
    E = config.get("num_experts", config.get("num_local_experts"))
    I = config.get("moe_intermediate_size", config.get("intermediate_size"))
    if E is None or I is None:
        raise KeyError("config.json has no num_experts/num_local_experts or no intermediate size")
    return E, config["num_experts_per_tok"], config["hidden_size"], I


def load_experts(path: str, arch: str, layer: int, E: int):
    """Stacks the layer's experts into gate/up [E, I, H] and down [E, H, I] bf16 tensors."""
    prefix, gate_name, up_name, down_name = ARCHS[arch]
    st = SafeTensorsFile(os.path.join(path, "model.safetensors"))

    def stack(name):
        return torch.stack([st.get(prefix.format(layer=layer, e=e) + name + ".weight") for e in range(E)])

    return stack(gate_name).contiguous(), stack(up_name).contiguous(), stack(down_name).contiguous()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_routed_experts_match_transformers(arch):
    path = os.path.join(fixtures_dir(), "hf", arch)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    E, k, H, I = model_shape(config)
    ref = np.load(os.path.join(path, "reference.npz"))
    layer = int(ref["layer"])
    gate, up, down = load_experts(path, arch, layer, E)
    assert gate.shape == (E, I, H) and down.shape == (E, H, I)

    moe = KTMoEWrapper(
        **wrapper_args(
            E, k, H, I, layer_idx=layer, weight_path=path, chunked_prefill_size=max(TOKENS), method="BF16"
        )
    )
    moe.load_weights_from_tensors(gate, up, down, None)
    for T in TOKENS:
        x = torch.from_numpy(ref[f"x_{T}"]).to(torch.bfloat16)  # bf16 values stored as float32: exact.
        ids = torch.from_numpy(ref[f"ids_{T}"]).to(torch.int64).contiguous()
        weights = torch.from_numpy(ref[f"weights_{T}"]).to(torch.float32).contiguous()
        expected = torch.from_numpy(ref[f"routed_{T}"])
        out = moe.forward(x, ids, weights, None)
        assert out.shape == (T, H)
        err = relative_error(out, expected)
        # Sanity of the reading above: our own reference agrees with transformers too.
        ours = relative_error(reference_moe(x, ids, weights, gate, up, down), expected)
        assert err <= REL_TOL, f"{arch} T={T}: max|err|/max|ref| = {err:.3e} (torch reference: {ours:.3e})"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
