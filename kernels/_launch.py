"""When a Triton kernel can run: on CUDA tensors, or anywhere under ``TRITON_INTERPRET=1`` (the CPU
interpreter the tests use). Otherwise each op falls back to its PyTorch reference."""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # no Triton wheel for this platform: the PyTorch references serve
    HAVE_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the kernel path applies to these tensors (else the op uses its reference)."""
    if not HAVE_TRITON:
        return False
    return all(t.is_cuda for t in tensors) or (interpreting() and all(t.device.type == "cpu" for t in tensors))
