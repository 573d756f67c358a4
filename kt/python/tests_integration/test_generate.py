"""kt/python/examples/generate.py on testdata/hf checkpoints: greedy tokens with kt's experts (CPU only, and the
hybrid split with masked experts in torch) equal plain transformers' on the same model.

How the comparison is made honest. The model runs in float32 (the checkpoints are bf16, so its weights are
exact); the reference computes the experts in float32 from those weights, kt in bf16 with fp32 accumulation
(inputs and its output rounded to bf16). So the logits differ a little: on these models, teacher-forced
over the generated positions, by at most 0.016 (mixtral; logits span about +-3.5). The tests assert that
bound (LOGIT_TOL = 0.025) and compare tokens only where it decides them: on random tiny models a greedy step
often has a near-tie (top-1 minus top-2 logit down to 0.001), where either token is right. The prompt is
therefore chosen (PROMPTS, from seeded random ones) so that the reference's margin exceeds 2 * LOGIT_TOL at every
step; with the logits within LOGIT_TOL, the argmax cannot change, so equal tokens are then required, and a
difference is a wrong result, never a tie. ``test_check_catches_wrong_experts`` shows both checks fail when
kt computes with two experts' weights swapped.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TESTDATA_HF = os.path.join(HERE, "..", "..", "..", "testdata", "hf")

_spec = importlib.util.spec_from_file_location("kt_generate_example", os.path.join(HERE, "..", "examples", "generate.py"))
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

MODELS = ["qwen3_moe", "mixtral", "deepseek_v3"]
NEW_TOKENS = 12
PROMPT_LEN = 8
LOGIT_TOL = 0.025
MARGIN = 2 * LOGIT_TOL
# Experts computed by torch in the hybrid tests (every MoE layer); the tests check that they are routed to.
MASK_IDS = [1, 4, 6]
THREADS = 2

_references = {}


def folder(name):
    return os.path.join(TESTDATA_HF, name)


def teacher_forced_logits(model, prompt, tokens):
    """Logits predicting each generated token, given the prompt and the tokens before it: [len(tokens), V]."""
    seq = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        return model(input_ids=seq).logits[0, len(prompt) - 1 : -1].float()


# Prompts whose every greedy step has a reference margin above MARGIN (found by search_prompt; the tests
# assert the margins, so a remade checkpoint that breaks this fails with a new prompt to put here).
PROMPTS = {
    "qwen3_moe": [39, 11, 0, 41, 11, 16, 3, 2],
    "mixtral": [47, 19, 38, 53, 12, 52, 24, 57],
    "deepseek_v3": [22, 44, 26, 19, 47, 49, 18, 21],
}


def search_prompt(model, tries=60):
    """The first seeded random prompt whose every greedy step has a reference margin above MARGIN, or None."""
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(1234)
    for _ in range(tries):
        prompt = torch.randint(0, vocab, (PROMPT_LEN,), generator=g).tolist()
        if min(gen.greedy(model, prompt, NEW_TOKENS)[1]) > MARGIN:
            return prompt
    return None


def reference(name):
    """(prompt, tokens, margins, teacher-forced logits) of plain transformers in float32."""
    if name not in _references:
        model = gen.load_model(folder(name), torch.float32, "cpu")
        prompt = PROMPTS[name]
        tokens, margins, _ = gen.greedy(model, prompt, NEW_TOKENS)
        if min(margins) <= MARGIN:
            pytest.fail(
                f"{name}: prompt {prompt} has a reference greedy margin {min(margins):.4f} <= {MARGIN}, so "
                f"equal tokens would not be decided by the logit bound; search_prompt suggests "
                f"{search_prompt(model)}"
            )
        _references[name] = (prompt, tokens, margins, teacher_forced_logits(model, prompt, tokens))
    return _references[name]


def kt_generate(name, mask_ids=None, swap=None):
    """(tokens, teacher-forced logits along the reference's tokens, expert ids routed to the torch experts)
    of the model with kt's experts; ``swap=(a, b)`` loads kt's experts a and b swapped (a wrong kt)."""
    prompt, ref_tokens, _, _ = reference(name)
    model = gen.load_model(folder(name), torch.float32, "cpu")
    mask = None
    if mask_ids is not None:
        mask = torch.zeros(gen.num_routed_experts(gen.get_moe_arch(model)[1]), dtype=torch.bool)
        mask[mask_ids] = True
    wrappers = gen.wrap_model(model, folder(name), "BF16", mask, THREADS, chunked_prefill_size=64)
    if swap is not None:
        a, b = swap
        E = wrappers[0].kt.num_experts
        perm = torch.arange(E)
        perm[a], perm[b] = b, a
        for w in wrappers:
            w.kt.load_weights(perm)
    torch_hits = []

    def record(module, args):
        ids = args[1]
        torch_hits.append(int(torch.isin(ids, module.gpu_ids).sum()))

    for w in wrappers:
        w.register_forward_pre_hook(record)
    tokens, _, _ = gen.greedy(model, prompt, NEW_TOKENS)
    logits = teacher_forced_logits(model, prompt, ref_tokens)
    return tokens, logits, sum(torch_hits)


@pytest.mark.parametrize("hybrid", [False, True], ids=["cpu", "cpu-hybrid"])
@pytest.mark.parametrize("name", MODELS)
def test_tokens_equal_transformers(name, hybrid):
    prompt, ref_tokens, margins, ref_logits = reference(name)
    tokens, logits, torch_hits = kt_generate(name, MASK_IDS if hybrid else None)
    err = (logits - ref_logits).abs().max().item()
    print(f"{name} {'hybrid' if hybrid else 'cpu'}: prompt {prompt}, max |logit diff| {err:.4f}, smallest "
          f"reference margin {min(margins):.4f}, {torch_hits} routed slots on torch experts")
    assert err < LOGIT_TOL, f"{name}: kt's logits differ from transformers' by {err:.4f} >= {LOGIT_TOL}"
    assert tokens == ref_tokens, f"{name}: kt {tokens} vs transformers {ref_tokens} (margins {margins})"
    if hybrid:
        assert torch_hits > 0, "the masked experts were never routed to: the hybrid path was not exercised"
    else:
        assert torch_hits == 0


def test_check_catches_wrong_experts():
    """kt with experts 0 and 5 swapped in every layer fails the logit bound and the token comparison."""
    name = "qwen3_moe"
    _, ref_tokens, _, ref_logits = reference(name)
    tokens, logits, _ = kt_generate(name, swap=(0, 5))
    err = (logits - ref_logits).abs().max().item()
    print(f"{name} with experts 0 and 5 swapped: max |logit diff| {err:.4f}, tokens {tokens} vs {ref_tokens}")
    assert err > 4 * LOGIT_TOL
    assert tokens != ref_tokens


def test_command_line():
    """The example's command line, hybrid with --num-gpu-experts, exits 0 with --check (tokens equal)."""
    name = "mixtral"
    args = ["--model", folder(name), "--check", "--num-gpu-experts", "3", "--threads", str(THREADS),
            "--max-new-tokens", str(NEW_TOKENS), "--prompt-ids", *map(str, PROMPTS[name])]
    assert gen.main(args) == 0
