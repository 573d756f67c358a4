"""``wrap_moe_layers_with_kt_wrapper``: moves the routed experts of a transformers MoE model into kt."""

from __future__ import annotations

import gc
import os
import types
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .._args import SftArgs
from .amx import AMXSFTMoEWrapper
from .arch import (
    PER_EXPERT_ROUTED_TYPES,
    extract_expert_weights,
    find_experts,
    get_moe_arch,
    is_fused_experts,
    num_routed_experts,
    per_expert_names,
    route_softmax_topk,
)
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

    The PyTorch expert weights are dropped from the model (kt keeps its own copy; with ``kt_weight_path``
    kt reads them from that folder instead of the model's tensors). Routers, shared experts, attention and
    everything else are untouched. A per-expert ModuleList block (transformers 4 layout; qwen2_moe,
    qwen3_moe, mixtral) keeps its expert modules (weights replaced by a broadcast zero) for PEFT, gets a
    ``kt_experts`` wrapper and a forward that routes into it (see ``kt_adapt_peft_lora``).
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


class ExpertsToLoad(nn.Module):
    """Stands for a fused experts module whose weights were never loaded into PyTorch (``load_kt_model``):
    it holds the shape only; ``wrap_moe_layers_with_kt_wrapper`` reads the weights from ``kt_weight_path``."""

    def __init__(self, num_experts: int, hidden_size: int, moe_intermediate_size: int):
        super().__init__()
        self.num_experts, self.hidden_size, self.moe_intermediate_size = num_experts, hidden_size, moe_intermediate_size

    def forward(self, *args, **kwargs):
        raise RuntimeError("experts not loaded: wrap_moe_layers_with_kt_wrapper(model, kt_config) moves them into kt")


def read_experts_from_path(path, layer_idx: int, E: int, H: int, I: int, where: str):
    """(gate [E, I, H], up [E, I, H], down [E, H, I]) bf16 of MoE layer ``layer_idx`` read by kt from a
    Hugging Face folder or a bf16 ``kt convert`` folder (checksums verified)."""
    from .. import _native

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"kt_weight_path must be a folder path (str), got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"kt_weight_path={path!r}: not a folder (expected a Hugging Face model folder or a kt convert folder)"
        )
    gate = torch.empty((E, I, H), dtype=torch.bfloat16)
    up = torch.empty((E, I, H), dtype=torch.bfloat16)
    down = torch.empty((E, H, I), dtype=torch.bfloat16)
    try:
        _native._kt.read_layer_experts_bf16(path, layer_idx, E, H, I, gate.data_ptr(), up.data_ptr(), down.data_ptr())
    except (ValueError, OSError) as e:
        raise type(e)(f"{where}: kt_weight_path={path!r}: {e}") from e
    return gate, up, down


def _expert_shapes(experts, names):
    """(E, I, H) of a fused, pending or per-expert experts module, read from shapes only (meta works)."""
    if isinstance(experts, ExpertsToLoad):
        return experts.num_experts, experts.moe_intermediate_size, experts.hidden_size
    if names is None:
        E, two_i, H = experts.gate_up_proj.shape
        return E, two_i // 2, H
    gate = getattr(experts[0], names[0])
    return len(experts), gate.out_features, gate.in_features


def _pin(module: nn.Module) -> None:
    """``module.to(...)`` / ``.cuda()`` / ``.half()`` leave ``module`` and everything below it as they are (the
    per-expert modules whose base weights kt dropped and whose PEFT LoRA kt reads in place, on the CPU)."""
    cls = type(module)
    if getattr(cls, "_kt_pinned", False):
        return
    module.__class__ = type(cls.__name__, (cls,), {"_kt_pinned": True, "_apply": lambda self, fn, recurse=True: self})


def _per_expert_projection_names(tc, block, experts, where):
    """None for fused (transformers 5) experts or experts still to load; else the projection names of a
    per-expert ModuleList (transformers 4), in a block kt can route."""
    if isinstance(experts, ExpertsToLoad) or is_fused_experts(experts):
        return None
    names = per_expert_names(experts)
    if names is None:
        extract_expert_weights(experts, where)  # raises the ValueError describing the layouts kt reads
    model_type = getattr(tc, "model_type", None)
    if model_type not in PER_EXPERT_ROUTED_TYPES or not isinstance(getattr(block, "gate", None), nn.Linear):
        raise NotImplementedError(
            f"{where}: per-expert ModuleList experts (transformers 4 layout) route in the block itself; kt "
            f"routes such blocks for model types {', '.join(PER_EXPERT_ROUTED_TYPES)} with a Linear `gate` "
            f"(this is {model_type!r}); transformers 5 fused experts (gate_up_proj/down_proj) of every "
            "supported type are wrapped as they are"
        )
    return names


def _wrap_block(cfg, tc, layer_idx, block, attr, experts, top_k, share_pool, retain, generator):
    """Moves one MoE block's experts into a kt backend and puts a ``KTMoELayerWrapper`` in their place (a
    transformers 5 block), or beside them with the block's forward routed into kt (a per-expert ModuleList
    of transformers 4)."""
    where = f"layer {layer_idx} ({type(experts).__name__})"
    if isinstance(experts, KTMoELayerWrapper) or isinstance(getattr(block, "kt_experts", None), KTMoELayerWrapper):
        raise ValueError(f"{where}: already wrapped by kt")
    names = _per_expert_projection_names(tc, block, experts, where)
    E, I, H = _expert_shapes(experts, names)
    if cfg.kt_weight_path is not None:
        gate, up, down = read_experts_from_path(cfg.kt_weight_path, layer_idx, E, H, I, where)
    elif isinstance(experts, ExpertsToLoad):
        raise ValueError(f"{where}: the experts' weights were not loaded; give kt_weight_path (the model folder)")
    else:
        gate, up, down = extract_expert_weights(experts, where)
    declared = num_routed_experts(tc)
    if declared not in (None, E):
        raise ValueError(f"{where}: {E} experts in the weights, {declared} routed experts in the config")
    returns_logits = False
    if names is not None:
        # transformers 4's blocks return (hidden_states, router_logits); kt's forward returns what this
        # block's own forward returns (one token through it, before its weights go).
        p = next(block.parameters())
        with torch.no_grad():
            returns_logits = isinstance(block(torch.zeros((1, 1, H), dtype=p.dtype, device=p.device)), tuple)
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
    if names is None:
        setattr(block, attr, wrapper)
        # Free the PyTorch expert weights (kt copied them).
        for name in ("gate_up_proj", "down_proj"):
            if isinstance(getattr(experts, name, None), nn.Parameter):
                experts._parameters[name] = None
        return wrapper
    # Per-expert ModuleList: the experts stay (PEFT finds their projections there and saves its adapters under
    # their names) with their weights replaced by one zero each, broadcast to the shape (no memory); the
    # block routes into kt.
    for expert in experts:
        for n in names:
            lin = getattr(expert, n)
            zero = torch.zeros((), dtype=lin.weight.dtype).expand(lin.out_features, lin.in_features)
            lin.weight = nn.Parameter(zero, requires_grad=False)
    _pin(experts)
    wrapper.__dict__["_per_expert_modules"] = experts  # not a submodule: it stays where the model has it
    block.kt_experts = wrapper
    block._kt_routing = (tc, returns_logits)
    block.forward = types.MethodType(_per_expert_block_forward, block)
    return wrapper


def _per_expert_block_forward(block, hidden_states):
    """The forward of a transformers 4 MoE block whose experts are in kt: the block's routing
    (``route_softmax_topk``), kt's experts, the shared expert where the block has one."""
    kt = block.kt_experts
    tc, returns_logits = block._kt_routing
    if kt.has_lora and not kt.peft_adapted:
        views = peft_expert_views(kt, kt._per_expert_modules)
        if views is not None:  # PEFT's get_peft_model put adapters on the experts since the last call
            kt.adapt_peft_lora(views)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    logits, ids, weights = route_softmax_topk(block, tc, x, kt.top_k)
    out = kt(x, ids, weights)
    shared = getattr(block, "shared_expert", None)
    if shared is not None:
        y = shared(x)
        gate = getattr(block, "shared_expert_gate", None)
        out = out + (torch.sigmoid(gate(x)) * y if gate is not None else y)
    out = out.reshape(shape)
    return (out, logits) if returns_logits else out


def peft_expert_views(wrapper: KTMoELayerWrapper, experts: nn.Module):
    """Per ``LORA_NAMES`` entry, PEFT's E per-expert LoRA parameters of a per-expert ModuleList (for
    ``KTMoELayerWrapper.adapt_peft_lora``); None when PEFT put no adapter on these experts. ValueError naming
    the module when PEFT's adapters are not ones kt computes (only some projections, several adapters
    active, dropout, DoRA, a bias, another rank or scaling)."""
    names = per_expert_names(experts)
    where = f"layer {wrapper.layer_idx} experts"
    mods = [(n, e, getattr(experts[e], n)) for n in names for e in range(len(experts))]
    lora = [hasattr(m, "lora_A") and hasattr(m, "lora_B") for _, _, m in mods]
    if not any(lora):
        return None
    if not all(lora):
        bare = [f"{e}.{n}" for (n, e, _), has in zip(mods, lora) if not has][:4]
        raise ValueError(
            f"{where}: PEFT adapts {sum(lora)} of the {len(mods)} expert projections (not e.g. {bare}); kt's "
            f"LoRA covers {'/'.join(names)} of every expert: target all three in LoraConfig.target_modules"
        )
    scaling = float(wrapper.backend.lora_alpha) / wrapper.lora_rank  # (a Rank0Backend off rank 0 has no lora_scaling)
    views = {}
    for n, e, m in mods:
        active = list(getattr(m, "active_adapters", []))
        if len(active) != 1:
            raise ValueError(f"{where} {e}.{n}: {len(active)} active PEFT adapters; kt computes exactly one")
        a = active[0]
        if getattr(m, "use_dora", {}).get(a, False):
            raise ValueError(f"{where} {e}.{n}: DoRA (use_dora=True) is not what kt computes; use plain LoRA")
        if not isinstance(m.lora_dropout[a], nn.Identity):
            raise ValueError(f"{where} {e}.{n}: lora_dropout={m.lora_dropout[a].p}; kt has no LoRA dropout (use 0)")
        if m.lora_B[a].bias is not None:
            raise ValueError(f"{where} {e}.{n}: a LoRA bias (lora_bias=True) is not what kt computes")
        if abs(float(m.scaling[a]) - scaling) > 1e-6 * scaling:
            raise ValueError(
                f"{where} {e}.{n}: PEFT's scaling {float(m.scaling[a])} (lora_alpha / r), kt's "
                f"{scaling} (kt_lora_alpha {wrapper.backend.lora_alpha} / kt_lora_rank {wrapper.lora_rank}); "
                "set kt_lora_rank and kt_lora_alpha to LoraConfig's r and lora_alpha"
            )
        views.setdefault(n, ([], []))
        views[n][0].append(m.lora_A[a].weight)
        views[n][1].append(m.lora_B[a].weight)
    return tuple(v for n in names for v in views[n])


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
    ``device``, without ever holding the expert weights in PyTorch.

    The model is built with an ``ExpertsToLoad`` placeholder (a shape, no tensors) in place of every MoE
    block's routed experts, so ``from_pretrained`` has nowhere to put the checkpoint's expert tensors and
    skips them; the rest loads straight onto ``device``. Then ``wrap_moe_layers_with_kt_wrapper`` reads each
    layer's experts into kt from ``kt_weight_path`` (default: ``model_path``; a ``kt convert`` folder with a
    bf16 layout works too). (``build_kt_device_map`` is the map for loading a model whose experts are kept:
    here nothing of the experts is left to place, so the map is ``{"": device}``, which also keeps
    accelerate from dispatching the model across devices with hooks.)

    Args:
        model_path: the model folder.
        kt_config: as for ``wrap_moe_layers_with_kt_wrapper``; ``kt_weight_path`` unset means ``model_path``.
        device: where the non-expert modules go; None: "cuda" when a GPU is present, else "cpu".
        dtype: the model's dtype (kt holds the experts as bf16, or quantized per ``kt_backend``).
        model_class: the transformers class to load with; None: the config's ``architectures[0]`` when
            transformers has it, else ``AutoModelForCausalLM`` (transformers 5 classes: fused experts).
        from_pretrained_kwargs: passed on (not ``device_map``).

    Returns:
        The model (of ``model_class``), its MoE blocks' experts replaced by ``KTMoELayerWrapper`` (see
        ``kt_wrappers``).
    """
    import dataclasses

    import transformers

    if "device_map" in from_pretrained_kwargs:
        raise ValueError(
            "load_kt_model: device_map is not taken (the experts go to kt on the CPU, everything else to `device`)"
        )
    cfg = KTConfig.build(kt_config)
    if cfg.kt_weight_path is None:
        cfg = dataclasses.replace(cfg, kt_weight_path=os.fspath(model_path))
    config = transformers.AutoConfig.from_pretrained(model_path)
    model_class = _model_class(config, model_class)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if hasattr(model_class, "_model_mapping"):  # an Auto class: the concrete class it maps this config to
        model_class = model_class._model_mapping[type(config)]
    loader = _without_experts(model_class)
    model = loader.from_pretrained(model_path, dtype=dtype, device_map={"": device}, **from_pretrained_kwargs)
    model.__class__ = model_class
    wrap_moe_layers_with_kt_wrapper(model, cfg)
    return model


def _without_experts(model_class):
    """A subclass of ``model_class`` (an Auto class resolves through ``_model_mapping``) whose routed experts
    are ``ExpertsToLoad`` placeholders from construction on."""
    import transformers

    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise TypeError(f"model_class must be a transformers PreTrainedModel class, got {model_class!r}")

    def __init__(self, config, *args, **kwargs):
        model_class.__init__(self, config, *args, **kwargs)
        arch, _ = get_moe_arch(self)
        for layer_idx, block, attr, experts in list(find_experts(self, arch)):
            if not is_fused_experts(experts):
                raise NotImplementedError(
                    f"load_kt_model: layer {layer_idx} has per-expert experts ({type(experts).__name__}); it loads "
                    "transformers 5 models (fused experts). Load the model yourself and call "
                    "wrap_moe_layers_with_kt_wrapper"
                )
            E, two_i, H = experts.gate_up_proj.shape
            setattr(block, attr, ExpertsToLoad(E, H, two_i // 2))

    ignore = list(getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or [])
    return type(model_class.__name__, (model_class,), {
        "__init__": __init__,
        "__module__": model_class.__module__,
        # The checkpoint's routed expert tensors have no place in this model (kt reads them): not a warning.
        "_keys_to_ignore_on_load_unexpected": ignore + [r"(^|\.)experts\."],
    })


def _model_class(config, model_class):
    import transformers

    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
    return model_class or transformers.AutoModelForCausalLM


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
