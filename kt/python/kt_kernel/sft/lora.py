"""Saving and loading the LoRA adapters kt owns (the experts' LoRA of ``KTMoELayerWrapper``).

On disk (a folder, next to PEFT's ``adapter_model.safetensors`` of the non-expert modules when there is one):

- ``fused_expert_lora.safetensors``: per MoE layer L, ``layers.L.experts.{gate,up,down}_lora_{a,b}``, bf16,
  in kt's layout (A [E, r, in], B [E, out, r]; PEFT orientation, scaling lora_alpha / r).
- ``kt_adapter_manifest.json``: ``format`` "kt-fused-expert-lora", ``version`` 1, ``lora_rank``,
  ``lora_alpha``, ``layers`` (each with num_experts, hidden_size, moe_intermediate_size), the model's class
  and model_type, and the SHA-256 of the safetensors file.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

import torch
from torch import nn

from .layer import LORA_NAMES, KTMoELayerWrapper
from .wrapper import kt_wrappers

FUSED_LORA_FILE = "fused_expert_lora.safetensors"
MANIFEST_FILE = "kt_adapter_manifest.json"
MANIFEST_FORMAT = "kt-fused-expert-lora"
MANIFEST_VERSION = 1


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _lora_wrappers(model: nn.Module) -> List[KTMoELayerWrapper]:
    wrappers = [w for w in kt_wrappers(model) if w.has_lora]
    if not wrappers:
        raise ValueError(
            f"{type(model).__name__} has no kt experts with LoRA; call wrap_moe_layers_with_kt_wrapper first "
            "(with a backend that is not _SkipLoRA)"
        )
    return wrappers


def kt_lora_parameters(model: nn.Module, trainable: bool = True) -> List[nn.Parameter]:
    """The experts' LoRA parameters of every kt layer of ``model`` (inside a PEFT model too), in layer order,
    with ``requires_grad`` set to ``trainable``. PEFT's ``get_peft_model`` freezes every parameter that is
    not one of its own adapters, these included: call this after it, and pass the result to the
    optimizer with PEFT's parameters."""
    params = [p for w in _lora_wrappers(model) for p in w.trainable_lora_parameters()]
    for p in params:
        p.requires_grad_(trainable)
    return params


def update_kt_lora_pointers(model: nn.Module) -> None:
    """Points kt at the current storage of every kt layer's LoRA parameters. In-place optimizer updates need
    nothing (kt reads the same storage at every call), and each forward re-registers a parameter whose
    ``.data`` was replaced (a PEFT per-expert view whose ``.data`` moved is copied back into kt's tensor and
    viewed again); this does it at once, for callers written against the original's API (which called it
    after every ``optimizer.step``)."""
    for w in _lora_wrappers(model):
        w._check_lora_storage()


def kt_adapt_peft_lora(model: nn.Module) -> List[KTMoELayerWrapper]:
    """Makes PEFT's own LoRA adapters on per-expert ``gate_proj/up_proj/down_proj`` (or ``w1/w3/w2``)
    modules views into kt's contiguous LoRA tensors, for every kt layer of ``model`` wrapped from a
    per-expert ``ModuleList`` (transformers 4 layout) whose expert projections PEFT targets.

    Call it after ``peft.get_peft_model`` (the forward of such a layer also does it on its first call).
    The adapter keeps PEFT's names and values (its init, or what ``PeftModel.from_pretrained`` loaded), so
    ``save_pretrained`` writes, and plain PEFT loads, an ordinary PEFT adapter; kt computes with it in
    place. PEFT's parameters become bf16 CPU tensors (kt's dtype). PEFT's ``r`` and scaling must equal
    ``kt_lora_rank`` and ``kt_lora_alpha / kt_lora_rank``, its dropout 0 and one adapter active (ValueError
    naming the module otherwise). Returns the layers adapted."""
    from .wrapper import peft_expert_views

    adapted = []
    for w in _lora_wrappers(model):
        experts = getattr(w, "_per_expert_modules", None)
        if experts is None:
            continue
        views = peft_expert_views(w, experts)
        if views is not None:
            w.adapt_peft_lora(views)
            adapted.append(w)
    return adapted


def _kt_owned(model: nn.Module) -> List[KTMoELayerWrapper]:
    """The kt layers whose LoRA kt saves (not PEFT's per-expert adapters, which PEFT saves)."""
    wrappers = [w for w in _lora_wrappers(model) if not w.peft_adapted]
    if not wrappers:
        raise ValueError(
            f"{type(model).__name__}: every kt layer's LoRA is PEFT's per-expert adapter (kt_adapt_peft_lora); "
            "PEFT's save_pretrained / PeftModel.from_pretrained save and load it"
        )
    return wrappers


def kt_lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``layers.L.experts.<name>`` -> a copy of that LoRA tensor, for every kt layer of ``model`` whose LoRA
    kt owns."""
    return {
        f"layers.{w.layer_idx}.experts.{name}": t.detach().clone()
        for w in _kt_owned(model)
        for name, t in zip(LORA_NAMES, w.lora_parameters())
    }


def save_kt_adapter_artifacts(model: nn.Module, output_dir: str) -> Dict[str, str]:
    """Writes ``fused_expert_lora.safetensors`` and ``kt_adapter_manifest.json`` into ``output_dir``
    (created if missing; the files are replaced atomically). Returns {"lora": path, "manifest": path}."""
    from safetensors.torch import save_file

    wrappers = _kt_owned(model)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FUSED_LORA_FILE)
    tmp = path + ".tmp"
    save_file(kt_lora_state_dict(model), tmp, metadata={"format": MANIFEST_FORMAT})
    os.replace(tmp, path)
    config = getattr(model, "config", None)
    tc = getattr(config, "text_config", None) or config
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "file": FUSED_LORA_FILE,
        "sha256": _sha256(path),
        "lora_rank": wrappers[0].lora_rank,
        "lora_alpha": wrappers[0].backend.lora_alpha,
        "method": wrappers[0].backend.method,
        "model_class": type(model).__name__,
        "model_type": getattr(tc, "model_type", None),
        "layers": {
            str(w.layer_idx): {
                "num_experts": w.num_experts,
                "hidden_size": w.hidden_size,
                "moe_intermediate_size": w.moe_intermediate_size,
            }
            for w in wrappers
        },
    }
    mpath = os.path.join(output_dir, MANIFEST_FILE)
    with open(mpath + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(mpath + ".tmp", mpath)
    return {"lora": path, "manifest": mpath}


def load_kt_adapter_artifacts(model: nn.Module, adapter_dir: str, strict: bool = True) -> Optional[dict]:
    """Loads the experts' LoRA saved by ``save_kt_adapter_artifacts`` into ``model``'s kt layers (copied in
    place into the parameters kt reads).

    Checks the manifest when present (format, version, rank, alpha, layer shapes, SHA-256) and raises
    ValueError naming what differs. ``strict``: every kt layer of the model must be in the file and every
    layer of the file in the model. Returns the manifest (None when the folder has none). A folder without
    ``fused_expert_lora.safetensors`` is FileNotFoundError (PEFT per-expert adapters are PEFT's to load).
    """
    from safetensors.torch import load_file

    path = os.path.join(adapter_dir, FUSED_LORA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{adapter_dir}: no {FUSED_LORA_FILE} (kt's expert LoRA) in this folder")
    wrappers = _kt_owned(model)
    manifest = None
    mpath = os.path.join(adapter_dir, MANIFEST_FILE)
    if os.path.isfile(mpath):
        with open(mpath) as f:
            manifest = json.load(f)
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"{mpath}: format/version {manifest.get('format')!r}/{manifest.get('version')!r}, expected "
                f"{MANIFEST_FORMAT!r}/{MANIFEST_VERSION}"
            )
        if manifest.get("sha256") != _sha256(path):
            raise ValueError(f"{path}: SHA-256 differs from the manifest's (file changed or truncated)")
        rank, alpha = wrappers[0].lora_rank, wrappers[0].backend.lora_alpha
        if manifest.get("lora_rank") != rank or float(manifest.get("lora_alpha")) != float(alpha):
            raise ValueError(
                f"{mpath}: adapter has lora_rank={manifest.get('lora_rank')}, lora_alpha={manifest.get('lora_alpha')}; "
                f"the model's kt layers have lora_rank={rank}, lora_alpha={alpha} (set kt_lora_rank/kt_lora_alpha)"
            )
    tensors = load_file(path)
    by_layer: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        parts = key.split(".")
        if len(parts) != 4 or parts[0] != "layers" or parts[2] != "experts" or parts[3] not in LORA_NAMES:
            raise ValueError(f"{path}: unexpected key {key!r} (expected layers.<L>.experts.<gate|up|down>_lora_<a|b>)")
        by_layer.setdefault(int(parts[1]), {})[parts[3]] = t
    model_layers = {w.layer_idx for w in wrappers}
    if strict and set(by_layer) != model_layers:
        raise ValueError(
            f"{path}: layers {sorted(by_layer)} in the file, kt layers {sorted(model_layers)} in the model"
        )
    for w in wrappers:
        if w.layer_idx in by_layer:
            missing = [n for n in LORA_NAMES if n not in by_layer[w.layer_idx]]
            if missing:
                raise ValueError(f"{path}: layer {w.layer_idx} lacks {missing}")
            w.load_lora_state(by_layer[w.layer_idx])
    return manifest
