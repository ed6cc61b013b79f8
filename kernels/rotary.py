"""Rotary position embedding (RoPE, Su et al., 2021) in transformers' "rotate half" layout:

    out[..., :D/2] = x1·cos − x2·sin,   out[..., D/2:] = x2·cos + x1·sin,   x1, x2 = x[..., :D/2], x[..., D/2:]

with ``cos``/``sin`` as transformers' rotary modules return them, (B, T, D) with both halves equal.
``x`` is (B, H, T, D) (queries or keys). One program rotates one (batch, head, position) row.
"""

from __future__ import annotations

import torch

from slmkit.kernels._launch import HAVE_TRITON, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotary_kernel(X, COS, SIN, Y, heads, positions, stride_xb, stride_xh, stride_xt, stride_cb, stride_ct,
                       HALF: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)  # over B·H·T
        t = row % positions
        h = (row // positions) % heads
        b = row // (positions * heads)
        cols = tl.arange(0, BLOCK)
        mask = cols < HALF
        x_row = X + b * stride_xb + h * stride_xh + t * stride_xt
        x1 = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF + cols, mask=mask, other=0.0).to(tl.float32)
        c_row = b * stride_cb + t * stride_ct
        cos = tl.load(COS + c_row + cols, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(SIN + c_row + cols, mask=mask, other=0.0).to(tl.float32)
        y_row = Y + row * 2 * HALF  # Y is contiguous (B, H, T, D)
        tl.store(y_row + cols, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
        tl.store(y_row + HALF + cols, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of :func:`rotary` (float32 math, one rounding)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos[:, None, :, :half].float(), sin[:, None, :, :half].float()  # (B, 1, T, D/2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by the angles of ``cos``/``sin`` (B, T, D); returns a new tensor."""
    if x.dim() != 4 or x.shape[-1] % 2 or cos.shape != sin.shape or cos.shape != (x.shape[0], x.shape[2], x.shape[3]):
        raise ValueError(f"rotary: x must be (B, H, T, D) with even D and cos/sin (B, T, D); got x {tuple(x.shape)}, "
                         f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if not use_triton(x, cos, sin):
        return rotary_ref(x, cos, sin)
    batch, heads, positions, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty((batch, heads, positions, dim), dtype=x.dtype, device=x.device)
    _rotary_kernel[(batch * heads * positions,)](
        x, cos, sin, y, heads, positions, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
        HALF=dim // 2, BLOCK=triton.next_power_of_2(dim // 2))
    return y
