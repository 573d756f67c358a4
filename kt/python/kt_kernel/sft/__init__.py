"""kt_kernel.sft: MoE supervised fine-tuning (LoRA) on the CPU — not implemented yet.

The package exists so that the original kt-kernel's import paths resolve; ``KTMoEWrapper(mode="sft", ...)``
raises NotImplementedError naming the method. ``import kt_kernel`` never imports this package (inference
users do not pay for it).
"""
