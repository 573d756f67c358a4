"""``wrap_moe_layers_with_kt_wrapper``: moves the routed experts of a transformers MoE model into kt."""

from __future__ import annotations

import gc
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .._args import SftArgs
from .amx import AMXSFTMoEWrapper
from .arch import extract_expert_weights, find_experts, get_moe_arch, is_fused_experts, num_routed_experts
from .config import KTConfig
from .distributed import Rank0Backend, distributed_world
from .layer import KTMoELayerWrapper


def wrap_moe_layers_with_kt_wrapper(
    model: nn.Module,
    kt_config: Any = None,
    gradient_checkpointing: Optional[bool] = None,
) -> List[KTMoELayerWrapper]:
    """Replaces the ``experts`` of every MoE block of ``model`` by a ``KTMoELayerWrapper`` running them in kt.

    Args:
        model: a transformers model of one of ``kt_kernel.sft.arch.SUPPORTED_MODEL_TYPES`` (the text config's
            model_type), with its weights loaded (experts on the CPU or a GPU, any float dtype: kt holds them
            as bf16, or quantized per ``kt_backend``).
        kt_config: a ``KTConfig``, a mapping of its ``kt_*`` keys, an object carrying one (see
            ``KTConfig.from_object``), or None (environment and defaults).
        gradient_checkpointing: whether training recomputes activations; decides ``kt_share_cache_pool`` when
            it is unset. None: read from ``model.is_gradient_checkpointing`` (False when absent).

    Returns:
        The wrappers, in layer order. Their LoRA parameters (``requires_grad=True``) are the model's
        ``...experts.{gate,up,down}_lora_{a,b}``.

    The PyTorch expert weights are dropped from the model (kt keeps its own copy). Routers, shared experts,
    attention and everything else are untouched.
    """
    cfg = KTConfig.build(kt_config)
    arch, tc = get_moe_arch(model)
    if gradient_checkpointing is None:
        gradient_checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))
    top_k = getattr(tc, "num_experts_per_tok", None)
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(
            f"{type(model).__name__}: config.num_experts_per_tok={top_k!r}; expected the top-k as an int >= 1"
        )
    share_pool = cfg.share_cache_pool(gradient_checkpointing)
    retain = cfg.cpu_policy == "retain"
    if share_pool and retain:
        raise ValueError(
            "kt_share_cache_pool=True with kt_activation_policy['cpu']='retain': retained caches of all layers "
            "are alive at once, a shared pool holds one layer's; use one of the two"
        )
    generator = None
    if cfg.kt_lora_init_seed is not None:
        generator = torch.Generator().manual_seed(int(cfg.kt_lora_init_seed))

    blocks = list(find_experts(model, arch))
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no MoE block with experts found (already wrapped?)")
    wrappers = [
        _wrap_block(cfg, tc, layer_idx, block, attr, experts, top_k, share_pool, retain, generator)
        for layer_idx, block, attr, experts in blocks
    ]
    wrappers.sort(key=lambda w: w.layer_idx)
    model.kt_config = cfg
    model._kt_wrappers = wrappers
    gc.collect()
    return wrappers


def _wrap_block(cfg, tc, layer_idx, block, attr, experts, top_k, share_pool, retain, generator):
    """Moves one MoE block's experts into a kt backend and puts a ``KTMoELayerWrapper`` in their place."""
    where = f"layer {layer_idx} ({type(experts).__name__})"
    if isinstance(experts, KTMoELayerWrapper):
        raise ValueError(f"{where}: already wrapped by kt")
    if not is_fused_experts(experts):
        raise NotImplementedError(
            f"{where}: per-expert ModuleList experts (transformers 4 layout, remote code) are routed by the "
            "block itself, not through experts(hidden_states, top_k_index, top_k_weights); kt wraps "
            "transformers 5 fused experts (gate_up_proj/down_proj)"
        )
    gate, up, down = extract_expert_weights(experts, where)
    E, I, H = gate.shape
    declared = num_routed_experts(tc)
    if declared not in (None, E):
        raise ValueError(f"{where}: {E} experts in the weights, {declared} routed experts in the config")
    rank, world = distributed_world()
    rank0_only = world > 1 and cfg.kt_rank0_experts is not False
    backend = None
    if not rank0_only or rank == 0:
        backend = AMXSFTMoEWrapper(
            SftArgs(
                layer_idx=layer_idx,
                num_experts=E,
                num_experts_per_tok=top_k,
                hidden_size=H,
                moe_intermediate_size=I,
                num_gpu_experts=cfg.kt_num_gpu_experts,
                cpuinfer_threads=cfg.kt_num_threads,
                threadpool_count=cfg.kt_threadpool_count,
                weight_path=None,
                # Rank 0 of rank-0-only experts takes every rank's tokens in one call.
                chunked_prefill_size=cfg.kt_model_max_length * (world if rank0_only else 1),
                lora_rank=cfg.kt_lora_rank,
                lora_alpha=cfg.lora_alpha,
                max_cache_depth=cfg.kt_max_cache_depth,
                method=cfg.method,
                group_size=cfg.kt_group_size,
                share_backward_bb=cfg.kt_share_backward_bb,
                share_cache_pool=share_pool,
            )
        )
        backend.load_weights_from_tensors(gate, up, down)
    if rank0_only:
        backend = Rank0Backend(backend, dict(
            method=cfg.method, lora_alpha=cfg.lora_alpha, chunked_prefill_size=cfg.kt_model_max_length,
            max_cache_depth=cfg.kt_max_cache_depth, skip_lora=cfg.method.endswith("_SkipLoRA"),
            num_experts=E, hidden_size=H, moe_intermediate_size=I, num_experts_per_tok=top_k,
        ))
    del gate, up, down
    wrapper = KTMoELayerWrapper(
        backend,
        layer_idx=layer_idx,
        num_experts=E,
        hidden_size=H,
        moe_intermediate_size=I,
        top_k=top_k,
        lora_rank=cfg.kt_lora_rank,
        retain_cpu_activations=retain,
        generator=generator,
    )
    setattr(block, attr, wrapper)
    # Free the PyTorch expert weights (kt copied them).
    for name in ("gate_up_proj", "down_proj"):
        if isinstance(getattr(experts, name, None), nn.Parameter):
            experts._parameters[name] = None
    return wrapper


def kt_wrappers(model: nn.Module) -> List[KTMoELayerWrapper]:
    """The ``KTMoELayerWrapper`` modules of ``model`` (inside PEFT or other wrappers too), in layer order."""
    found = [m for m in model.modules() if isinstance(m, KTMoELayerWrapper)]
    return sorted(found, key=lambda w: w.layer_idx)


def load_kt_model(
    model_path: str,
    kt_config: Any = None,
    device: Optional[str] = None,
    dtype: torch.dtype = torch.bfloat16,
    model_class: Any = None,
    **from_pretrained_kwargs,
) -> nn.Module:
    """Loads a Hugging Face model folder with its routed experts in kt (CPU) and everything else on
    ``device``.

    Args:
        model_path: the folder (or anything ``from_pretrained`` takes).
        kt_config: as for ``wrap_moe_layers_with_kt_wrapper``.
        device: where the non-expert modules go; None: "cuda" when a GPU is present, else "cpu".
        dtype: the model's dtype (kt holds the experts as bf16, or quantized per ``kt_backend``).
        model_class: the transformers class to load with; None: the config's ``architectures[0]`` when
            transformers has it, else ``AutoModelForCausalLM``.
        from_pretrained_kwargs: passed on (not ``device_map``: the model is loaded on the CPU, its experts
            moved into kt and freed, and only then the rest moved to ``device``).

    Returns:
        The model, its MoE blocks' experts replaced by ``KTMoELayerWrapper`` (see ``kt_wrappers``).
    """
    import transformers

    if "device_map" in from_pretrained_kwargs:
        raise ValueError(
            "load_kt_model: device_map is not taken (the model loads on the CPU, its experts go to kt, the rest "
            "to `device`)"
        )
    if model_class is None:
        model_class = _model_class(transformers.AutoConfig.from_pretrained(model_path), None)
    model = model_class.from_pretrained(model_path, dtype=dtype, **from_pretrained_kwargs)
    wrap_moe_layers_with_kt_wrapper(model, kt_config)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # KTMoELayerWrapper ignores .to(): the experts and their LoRA stay on the CPU, in kt.
    return model.to(device)


def build_kt_device_map(model_path: Any, device: Optional[str] = None, model_class: Any = None) -> Dict[str, str]:
    """A ``device_map`` for ``from_pretrained`` that loads every MoE block's routed ``experts`` on the CPU
    (where kt reads them) and everything else on ``device``, so a model larger than the GPU loads without
    ever holding its experts there.

    Args:
        model_path: a model folder (or anything ``AutoConfig.from_pretrained`` takes), or a config.
        device: where the rest goes; None: "cuda" when a GPU is present, else "cpu".
        model_class: the transformers class the model will be loaded with (None: the config's
            ``architectures[0]`` when transformers has it, else ``AutoModelForCausalLM``); its module names
            are the map's keys.

    Returns:
        Module names (or, in a module holding both, parameter and buffer names) to devices: every parameter
        and buffer of the model falls under exactly one key. Built on the meta device, reading no weights.
    """
    import transformers

    config = model_path
    if not isinstance(model_path, transformers.PretrainedConfig):
        config = transformers.AutoConfig.from_pretrained(model_path)
    model_class = _model_class(config, model_class)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        # A model class builds through _from_config, an Auto class through from_config.
        model = (getattr(model_class, "_from_config", None) or model_class.from_config)(config)
    arch, _ = get_moe_arch(model)
    experts = {id(e) for _, _, _, e in find_experts(model, arch)}
    if not experts:
        raise ValueError(f"{type(model).__name__}: no MoE block with experts found")
    holds = {}  # id(module) -> whether it holds an experts module (itself or below)

    def contains(m: nn.Module) -> bool:
        if id(m) not in holds:
            holds[id(m)] = id(m) in experts or any(contains(c) for c in m.children())
        return holds[id(m)]

    device_map: Dict[str, str] = {}

    def place(name: str, m: nn.Module) -> None:
        if id(m) in experts:
            device_map[name] = "cpu"
        elif not contains(m):
            device_map[name] = device
        else:  # mixed: its own tensors by name, its children one by one
            prefix = name + "." if name else ""
            for t, _ in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                device_map[prefix + t] = device
            for child_name, child in m.named_children():
                place(prefix + child_name, child)

    place("", model)
    return device_map


def _model_class(config, model_class):
    import transformers

    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
    return model_class or transformers.AutoModelForCausalLM
