"""kt_kernel.sft: MoE supervised fine-tuning (LoRA) on the CPU.

``KTMoEWrapper(mode="sft", method=...)`` returns an ``AMXSFTMoEWrapper`` (``kt_kernel.sft.amx``): forward with
an activation cache, backward giving grad_input, the router gradient and the six LoRA gradients over frozen
base experts. ``import kt_kernel`` never imports this package (inference users do not pay for it).
"""

from .amx import AMXSFTMoEWrapper
from .base import BaseSFTMoEWrapper, KExpertsSFTBuffer

__all__ = ["AMXSFTMoEWrapper", "BaseSFTMoEWrapper", "KExpertsSFTBuffer"]
