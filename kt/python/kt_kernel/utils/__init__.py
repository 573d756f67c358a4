"""Backend implementations behind kt_kernel.KTMoEWrapper, one module per family of methods."""
