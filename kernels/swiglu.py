"""Fused SwiGLU activation of gated FFNs (Shazeer, 2020): ``y = silu(gate) · up = gate·σ(gate) · up``.

One pass over the two (..., N) projections instead of three element-wise kernels; computed in float32,
rounded once. Inference only (no backward).
"""

from __future__ import annotations

import torch

from slmkit.kernels._launch import HAVE_TRITON, use_triton

BLOCK = 1024

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_kernel(GATE, UP, Y, numel, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        gate = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
        y = gate * tl.sigmoid(gate) * up
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of :func:`swiglu`."""
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, element-wise, for two tensors of the same shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ")
    if not use_triton(gate, up):
        return swiglu_ref(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    numel = gate.numel()
    _swiglu_kernel[(triton.cdiv(numel, BLOCK),)](gate, up, y, numel, BLOCK=BLOCK)
    return y
