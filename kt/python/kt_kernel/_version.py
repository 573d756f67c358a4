"""kt_kernel's version. //kt/python:BUILD (KT_KERNEL_VERSION) must agree; the wheel build checks."""

__version__ = "0.1.0"
