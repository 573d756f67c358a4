"""kt/python/examples/sft_lora.py end to end on testdata's tiny Qwen3-MoE folder: it trains (progress bar with
the loss and tokens/s, every step run), and the adapters it saves (kt's experts' LoRA and PEFT's on the
attention) are trained ones (the experts' B, zero at the start, moved) that load into a fresh kt model: its
parameters become the file's and its logits change. (That a loaded adapter reproduces logits exactly is
test_sft_hf's test_with_peft_on_attention.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import transformers

import hf_models

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "sft_lora.py")


@pytest.mark.skipif(not os.path.exists(EXAMPLE), reason="examples/ not carried here")
def test_example_fine_tunes_a_folder_and_saves_the_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    import kt_kernel.sft as kt_sft

    path = os.path.join(hf_models.TESTDATA_HF, "qwen3_moe")
    out = tmp_path / "adapter"
    proc = subprocess.run(
        [sys.executable, EXAMPLE, "--model", path, "--synthetic", "4", "--batch-size", "2", "--seq-len", "16",
         "--threads", "2", "--lr", "1e-2", "--output", str(out), "--attn-lora", "--gradient-checkpointing"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert re.search(r"loss=\d+\.\d+", log) and re.search(r"tok_s=\d+", log), log[-2000:]
    assert re.search(r"4/4", log), log[-2000:]
    assert {"fused_expert_lora.safetensors", "kt_adapter_manifest.json", "adapter_model.safetensors",
            "adapter_config.json"} <= set(os.listdir(out))
    saved = load_file(str(out / "fused_expert_lora.safetensors"))
    assert float(saved["layers.0.experts.down_lora_b"].float().abs().max()) > 0  # trained from B = 0

    # The saved adapters load into a fresh kt model (PEFT's, then kt's) and change its logits as trained.
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    kt_sft.wrap_moe_layers_with_kt_wrapper(model, {"kt_lora_rank": 8, "kt_lora_alpha": 16.0, "kt_num_threads": 2})
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model = peft.PeftModel.from_pretrained(model, str(out))
    kt_sft.load_kt_adapter_artifacts(model, str(out))
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert not torch.equal(before, after)
    w = kt_sft.kt_wrappers(model)[0]
    assert torch.equal(w.down_lora_b.detach(), saved["layers.0.experts.down_lora_b"])
