#!/usr/bin/env python3
"""LoRA fine-tuning of a Hugging Face MoE model folder with the routed experts in kt (CPU).

    python kt/python/examples/sft_lora.py --model /path/to/Qwen3-30B-A3B --data train.txt --output out/
    python kt/python/examples/sft_lora.py --model testdata/hf/qwen3_moe --synthetic 20 --output /tmp/ad

Trains LoRA on the experts (kt) and, with --attn-lora, PEFT LoRA on the attention projections; the routers
and everything else stay frozen. ``--data`` is a text file (one example per line, or JSON lines with a
"text" field) tokenized with the folder's tokenizer; ``--synthetic N`` trains on N random token batches
instead (for folders without a tokenizer). Prints a progress bar with the loss and tokens/s, and saves the
experts' LoRA (``fused_expert_lora.safetensors`` + manifest) and, with --attn-lora, PEFT's adapter into
--output.

The two lines that make a training script use kt are marked ``# kt``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import transformers
from tqdm import tqdm

from kt_kernel.sft import (
    get_activation_checkpoint_context_fn,
    kt_lora_parameters,
    save_kt_adapter_artifacts,
    wrap_moe_layers_with_kt_wrapper,
)


def token_batches(args, tokenizer, vocab_size):
    """Lists of [batch, seq_len] int64 tensors: the data file cut into seq_len windows, or random tokens."""
    g = torch.Generator().manual_seed(args.seed)
    if args.synthetic:
        shape = (args.batch_size, args.seq_len)
        return [torch.randint(0, vocab_size, shape, generator=g) for _ in range(args.synthetic)]
    if tokenizer is None:
        sys.exit(f"--data needs a tokenizer in {args.model} (or use --synthetic N)")
    ids = []
    with open(args.data) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            text = json.loads(line)["text"] if line.startswith("{") else line
            ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id or 0])
    window = args.batch_size * args.seq_len
    if len(ids) < window:
        sys.exit(f"{args.data}: {len(ids)} tokens, fewer than one batch ({window})")
    t = torch.tensor(ids[: len(ids) // window * window], dtype=torch.int64)
    return list(t.view(-1, args.batch_size, args.seq_len))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model folder (a supported MoE architecture)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="text file: one example per line, or JSON lines with a 'text' field")
    src.add_argument("--synthetic", type=int, metavar="N", help="train on N batches of random tokens")
    p.add_argument("--output", required=True, help="folder for the adapter")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--backend", default="AMXBF16", help="kt_backend: AMXBF16, AMXINT8, AMXINT4, ...")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="kt worker threads")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--attn-lora", action="store_true", help="also PEFT LoRA on q_proj/k_proj/v_proj/o_proj")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None
    kt_config = {  # the LLaMA-Factory-style kt_config (KTConfig keys; ACCELERATE_KT_* variables fill the rest)
        "kt_backend": args.backend,
        "kt_num_threads": args.threads,
        "kt_lora_rank": args.lora_rank,
        "kt_lora_alpha": args.lora_alpha,
        "kt_model_max_length": args.batch_size * args.seq_len,
    }
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False,
                                           "context_fn": get_activation_checkpoint_context_fn()})  # kt
    wrappers = wrap_moe_layers_with_kt_wrapper(model, kt_config)  # kt
    for name, param in model.named_parameters():
        param.requires_grad_("_lora_" in name)
    if args.attn_lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        kt_lora_parameters(model)  # PEFT froze everything but its own adapters; the experts' LoRA trains too
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    print(f"kt: {len(wrappers)} MoE layers in kt ({wrappers[0].backend.method}, {args.threads} threads); "
          f"{n_trainable / 1e6:.2f} M trainable parameters", flush=True)

    batches = token_batches(args, tokenizer, model.config.get_text_config().vocab_size)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    model.train()
    bar = tqdm(total=args.epochs * len(batches), unit="step", dynamic_ncols=True)
    tokens, start = 0, time.perf_counter()
    for _ in range(args.epochs):
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += ids.numel()
            bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.1f}")
            bar.update()
    bar.close()

    os.makedirs(args.output, exist_ok=True)
    files = save_kt_adapter_artifacts(model, args.output)
    if args.attn_lora:
        model.save_pretrained(args.output)
    print(f"saved the experts' LoRA to {files['lora']}" + (" and PEFT's adapter beside it" if args.attn_lora else ""))


if __name__ == "__main__":
    main()
