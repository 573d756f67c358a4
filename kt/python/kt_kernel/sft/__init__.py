"""kt_kernel.sft: MoE supervised fine-tuning (LoRA) on the CPU.

``KTMoEWrapper(mode="sft", method=...)`` returns an ``AMXSFTMoEWrapper`` (``kt_kernel.sft.amx``): forward with
an activation cache, backward giving grad_input, the router gradient and the six LoRA gradients over frozen
base experts. ``import kt_kernel`` never imports this package (inference users do not pay for it).

For training a transformers model (``README.md`` in this folder):

- ``KTConfig`` (``config``): the ``kt_*`` settings, from code, a mapping or ``ACCELERATE_KT_*`` variables.
- ``wrap_moe_layers_with_kt_wrapper(model, kt_config)`` (``wrapper``): the routed experts of every MoE block
  move into kt, each replaced by a ``KTMoELayerWrapper`` (``layer``) running ``KTMoEFunction`` (``autograd``).
- ``load_kt_model(path, kt_config)`` (``wrapper``): a model folder loaded and wrapped, the rest on the GPU.
- ``get_activation_checkpoint_context_fn()`` (``autograd``): the ``context_fn`` of non-reentrant
  gradient checkpointing.
- ``save_kt_adapter_artifacts`` / ``load_kt_adapter_artifacts`` (``lora``): the experts' LoRA on disk;
  ``kt_lora_parameters`` its parameters (trainable again after PEFT's ``get_peft_model`` froze them);
  ``kt_adapt_peft_lora`` makes PEFT's adapters on per-expert (transformers 4) experts views into kt's LoRA.
"""

from .amx import AMXSFTMoEWrapper
from .base import BaseSFTMoEWrapper, KExpertsSFTBuffer

from .arch import SUPPORTED_MODEL_TYPES
from .autograd import KTMoEFunction, get_activation_checkpoint_context_fn
from .config import KTConfig, backend_to_method
from .distributed import kt_allreduce_lora_grads
from .layer import KTMoELayerWrapper
from .lora import (
    kt_adapt_peft_lora,
    kt_lora_parameters,
    kt_lora_state_dict,
    load_kt_adapter_artifacts,
    save_kt_adapter_artifacts,
    update_kt_lora_pointers,
)
from .wrapper import build_kt_device_map, kt_wrappers, load_kt_model, wrap_moe_layers_with_kt_wrapper

__all__ = [
    "AMXSFTMoEWrapper",
    "BaseSFTMoEWrapper",
    "KExpertsSFTBuffer",
    "KTConfig",
    "KTMoEFunction",
    "KTMoELayerWrapper",
    "SUPPORTED_MODEL_TYPES",
    "backend_to_method",
    "get_activation_checkpoint_context_fn",
    "kt_adapt_peft_lora",
    "kt_allreduce_lora_grads",
    "kt_lora_parameters",
    "kt_lora_state_dict",
    "kt_wrappers",
    "build_kt_device_map",
    "load_kt_model",
    "load_kt_adapter_artifacts",
    "save_kt_adapter_artifacts",
    "update_kt_lora_pointers",
    "wrap_moe_layers_with_kt_wrapper",
]
