"""Fused RMSNorm, optionally with the residual add before it (Zhang & Sennrich, 2019):

    h = x + residual                      (when a residual is given; h is also returned: the new residual)
    y = h / sqrt(mean(h²) + eps) · (weight_offset + weight)

``weight_offset`` is 0 for Llama-family norms and 1 for Gemma's ``(1 + weight)``. Statistics are computed
in float32 and the output is rounded once to the input dtype. One program normalizes one row.
"""

from __future__ import annotations

import torch

from slmkit.kernels._launch import HAVE_TRITON, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rmsnorm_kernel(X, R, W, Y, H, stride_x, stride_r, stride_y, stride_h, N, eps, weight_offset,
                        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(H + row * stride_h + cols, x.to(H.dtype.element_ty), mask=mask)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + weight_offset
        tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
                weight_offset: float = 0.0):
    """PyTorch reference of :func:`rmsnorm` (same float32 statistics, one rounding)."""
    h = x.float() if residual is None else x.float() + residual.float()
    y = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps) * (weight.float() + weight_offset)
    return y.to(x.dtype) if residual is None else (y.to(x.dtype), h.to(x.dtype))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
            weight_offset: float = 0.0):
    """RMSNorm over the last dim of ``x`` (..., N); with ``residual`` returns ``(y, x + residual)``.

    Runs the Triton kernel on CUDA (or under ``TRITON_INTERPRET=1``), the reference elsewhere.
    """
    if x.shape[-1] != weight.shape[-1] or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rmsnorm: x {tuple(x.shape)}, weight {tuple(weight.shape)} and residual "
                         f"{None if residual is None else tuple(residual.shape)} do not match")
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if not use_triton(*tensors):
        return rmsnorm_ref(x, weight, eps, residual, weight_offset)
    n = x.shape[-1]
    rows = x.reshape(-1, n)  # (M, N): a view when the last dim is contiguous
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty_like(rows)
    residual_rows = residual.reshape(-1, n).contiguous() if residual is not None else rows
    h = torch.empty_like(rows) if residual is not None else y
    _rmsnorm_kernel[(rows.shape[0],)](
        rows, residual_rows, weight.contiguous(), y, h, rows.stride(0), residual_rows.stride(0), y.stride(0),
        h.stride(0), n, eps, weight_offset, HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n))
    y = y.view(x.shape)
    return y if residual is None else (y, h.view(x.shape))
