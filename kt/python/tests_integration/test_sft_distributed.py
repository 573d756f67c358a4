"""kt_kernel.sft under DistributedDataParallel: two gloo processes, each with half of every batch, against one
process with the whole batches; the experts either on rank 0 only (kt_rank0_experts, the default under
torch.distributed: the ranks' tokens are gathered to rank 0's kt and the results scattered back) or a copy
per rank (kt_rank0_experts=False).

With rank-0-only experts a layer's kt call sees both ranks' tokens at once, as the one-process run does, and
the LoRA gradients rank 0 computes are averaged (/ 2) and broadcast, so DDP's all-reduce of them changes
nothing. The bounds below hold for both placements.

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


def _fsdp2(model):
    """FSDP2 on every module that holds no kt experts (their frozen weights sharded across the ranks); the
    kt expert modules stay whole: with rank-0-only experts their LoRA gradients already arrive averaged on
    every rank, so they need no collective of FSDP's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from kt_kernel.sft import KTMoELayerWrapper

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    holds = {id(m) for m in model.modules() if any(isinstance(c, KTMoELayerWrapper) for c in m.modules())}
    for name, m in list(model.named_modules()):
        parent_holds = id(m) in holds
        for child_name, child in m.named_children():
            if parent_holds and id(child) not in holds and any(True for _ in child.parameters()):
                fully_shard(child, mesh=mesh)
    sharded = [n for n, p in model.named_parameters() if type(p).__name__ == "DTensor"]
    assert sharded and not any("_lora_" in n for n in sharded), sharded
    return model


def _train(model, data, rank=0, world=1, fsdp2=False):
    model.train()
    params = set_trainable(model)
    if world > 1 and fsdp2:
        net = _fsdp2(model)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    else:
        net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(list(params.values()), lr=LR)
    losses = []
    for ids in data:
        part = ids.chunk(world)[rank]
        loss = net(input_ids=part, labels=part).loss
        loss.backward()
        if world > 1 and fsdp2:
            # Per-rank experts: their LoRA gradients averaged here (FSDP2 leaves the kt modules alone);
            # rank-0-only experts: nothing to do (the call skips them).
            from kt_kernel.sft import kt_allreduce_lora_grads

            averaged = kt_allreduce_lora_grads(model)
            assert averaged == (12 if model.kt_config.kt_rank0_experts is False else 0), averaged
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
    return losses, {n: p.detach().float().clone() for n, p in params.items()}


def _model(rank0_experts=None):
    from kt_kernel.sft import wrap_moe_layers_with_kt_wrapper

    model = tiny_model("qwen3_moe")
    randomize_b(wrap_moe_layers_with_kt_wrapper(model, kt_settings(kt_num_threads=1,
                                                                    kt_rank0_experts=rank0_experts)))
    return model


def _worker(rank, world, store_path, out_path, rank0_experts, fsdp2=False):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _model(rank0_experts)
        from kt_kernel.sft import kt_wrappers
        from kt_kernel.sft.distributed import Rank0Backend

        holds = [w.backend.backend is not None if isinstance(w.backend, Rank0Backend) else True
                 for w in kt_wrappers(model)]
        assert all(holds) == (rank == 0 or rank0_experts is False), (rank, holds)
        losses, params = _train(model, batches(2, batch=4) * (STEPS // 2), rank, world, fsdp2)
        if rank == 0:
            torch.save({"losses": losses, "params": params}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rank0_experts", [None, False], ids=["rank0-experts", "experts-per-rank"])
def test_two_gloo_processes_match_one(tmp_path, rank0_experts):
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "store"), str(out), rank0_experts), nprocs=WORLD, join=True)
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
    if rank0_experts is None:
        # Rank 0's kt runs every step over the same rows as the one process and DDP's average of identical
        # gradients is exact, so only the loss's own reduction order differs (measured: losses 1.1e-7, adapters
        # equal). A lost rank's rows or a wrong 1/world_size scale moves them by percents.
        assert rel_loss < 1e-5
        assert worst < 1e-3


def test_fsdp2_with_experts_per_rank_matches_one(tmp_path):
    """FSDP2 with a copy of the experts per rank (kt_rank0_experts=False): kt_allreduce_lora_grads averages
    the experts' LoRA gradients, which FSDP2 leaves alone; the same steps as one process within the bounds
    of DDP with per-rank experts (other bf16 roundings of half batches). Measured 1.5e-3 (losses) and 7.9e-2
    (adapters); without the averaging (each rank stepping on its half's gradient) 2.8e-2 and 1.13."""
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "store"), str(out), False, True), nprocs=WORLD, join=True)
    got = torch.load(out)
    model = _model()
    init = {n: p.detach().float().clone() for n, p in model.named_parameters() if "_lora_" in n}
    losses, params = _train(model, batches(2, batch=4) * (STEPS // 2))
    rel_loss = max(abs(a - b) / b for a, b in zip(got["losses"], losses))
    worst = max(float((got["params"][n] - p).norm() / (p - init[n]).norm()) for n, p in params.items())
    print(f"FSDP2 per-rank experts, 2 processes vs 1: max relative loss difference {rel_loss:.2e}, worst adapter "
          f"difference relative to its change {worst:.2e}")
    assert rel_loss < 1e-2 and abs(got["losses"][1] - losses[1]) / losses[1] < 1e-4
    assert worst < 0.15


def test_fsdp2_with_rank0_experts_matches_one(tmp_path):
    """FSDP2 (fully_shard over gloo on the CPU) on every module but the kt experts, rank-0-only experts:
    the same steps as one process, as with DDP."""
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "store"), str(out), None, True), nprocs=WORLD, join=True)
    got = torch.load(out)
    model = _model()
    losses, params = _train(model, batches(2, batch=4) * (STEPS // 2))
    rel_loss = max(abs(a - b) / b for a, b in zip(got["losses"], losses))
    worst = max(float((got["params"][n] - p).norm() / p.norm()) for n, p in params.items())
    print(f"FSDP2 2 processes vs 1: losses {got['losses']} vs {losses}, max relative difference {rel_loss:.2e}, "
          f"worst adapter difference {worst:.2e}")
    assert rel_loss < 1e-5
    assert worst < 1e-3
