"""kt_kernel.sft under DistributedDataParallel: two gloo processes, each with its own kt experts and half of
every batch, against one process with the whole batches.

DDP averages the gradients of the parameters that require grad, kt's expert LoRA included (bf16 CPU
parameters, all-reduced by gloo), and each rank's loss is the mean over its half of the tokens, so the
averaged gradient is the gradient of the mean over the whole batch: the two runs take the same steps.
Plain SGD, so that the adapters compare linearly (Adam would turn gradient noise into whole steps). The
runs differ at the bf16 level: every bf16 matrix product of the model has other shapes (half the rows),
so other roundings, and gloo averages bf16 gradients. Measured: the second loss (which depends on step 0's
gradient only) by 1.9e-5 relative (bound 1e-4), every loss by <= 1.6e-3 (bound 1e-2, the issue's), the
adapters by <= 7.9e-2 of their change after 6 steps of lr 0.5 (bound 0.15).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_models import tiny_model

from test_sft_hf import batches, kt_settings, randomize_b, set_trainable

STEPS = 6
LR = 0.5
WORLD = 2


def _train(model, data, rank=0, world=1):
    model.train()
    params = set_trainable(model)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(list(params.values()), lr=LR)
    losses = []
    for ids in data:
        part = ids.chunk(world)[rank]
        loss = net(input_ids=part, labels=part).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
    return losses, {n: p.detach().float().clone() for n, p in params.items()}


def _model():
    from kt_kernel.sft import wrap_moe_layers_with_kt_wrapper

    model = tiny_model("qwen3_moe")
    randomize_b(wrap_moe_layers_with_kt_wrapper(model, kt_settings(kt_num_threads=1)))
    return model


def _worker(rank, world, store_path, out_path):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        losses, params = _train(_model(), batches(2, batch=4) * (STEPS // 2), rank, world)
        if rank == 0:
            torch.save({"losses": losses, "params": params}, out_path)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "store"), str(out)), nprocs=WORLD, join=True)
    got = torch.load(out)
    model = _model()
    init = {n: p.detach().float().clone() for n, p in model.named_parameters() if "_lora_" in n}
    losses, params = _train(model, batches(2, batch=4) * (STEPS // 2))
    rel_loss = max(abs(a - b) / b for a, b in zip(got["losses"], losses))
    print(f"2 processes vs 1: losses {got['losses']} vs {losses}, max relative difference {rel_loss:.2e}")
    assert rel_loss < 1e-2
    assert abs(got["losses"][1] - losses[1]) / losses[1] < 1e-4
    assert losses[-1] < losses[0] * 0.97
    worst = 0.0
    for name, p in params.items():
        rel = float((got["params"][name] - p).norm() / (p - init[name]).norm())
        worst = max(worst, rel)
        assert rel < 0.15, (name, rel)
    print(f"2 processes vs 1: worst adapter difference relative to its change {worst:.2e}")
