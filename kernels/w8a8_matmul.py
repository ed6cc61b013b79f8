"""W8A8 matmul with the activation quantization fused in: ``y = deq(Q(x) @ Wqᵀ) + b`` in one kernel.

Each program owns a (BLOCK_M, BLOCK_N) output tile. With dynamic (per-token) quantization it first reads
its rows of ``x`` once to find each token's ``max|x|`` (scale = max / 127), then reads them again,
rounds them to int8 and multiplies them with the int8 weight tiles on the int8 tensor cores (int32
accumulation). The epilogue applies ``x_scale · w_scale`` (per token × per output channel), adds the bias
and writes the output dtype: no int8 activation or int32 result ever goes to memory. With static
quantization a calibrated per-tensor scale replaces the first pass.
"""

from __future__ import annotations

import torch

from slmkit.kernels._launch import HAVE_TRITON, interpreting, use_triton

INT8_MAX = 127.0

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _w8a8_matmul_kernel(X, W, WS, XS, B, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                            STATIC: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rm < M
        if STATIC:
            x_scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(XS)
        else:  # pass 1: per-token max |x|
            amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=row_ok[:, None] & (rk[None, :] < K),
                            other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            x_scale = tl.maximum(amax / 127.0, 1e-8)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):  # pass 2: quantize and multiply
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=row_ok[:, None] & (rk[None, :] < K),
                        other=0.0).to(tl.float32)
            v = x / x_scale[:, None]
            v = tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5))  # round half away from zero
            x_q = tl.minimum(tl.maximum(v, -127.0), 127.0)
            w = tl.load(W + rn[None, :] * stride_wn + rk[:, None], mask=(rk[:, None] < K) & (rn[None, :] < N),
                        other=0)  # (BK, BN) int8
            if EMULATE:  # CPU interpreter: exact float32 products of small integers
                acc += tl.dot(x_q, w.to(tl.float32), input_precision="ieee").to(tl.int32)
            else:
                acc += tl.dot(x_q.to(tl.int8), w, out_dtype=tl.int32)
        w_scale = tl.load(WS + rn, mask=rn < N, other=0.0)
        out = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
        if HAS_BIAS:
            out += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * stride_ym + rn[None, :], out.to(Y.dtype.element_ty),
                 mask=row_ok[:, None] & (rn[None, :] < N))


def w8a8_matmul_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of :func:`w8a8_matmul`: quantize x per token (or by ``input_scale``), exact int GEMM."""
    xf = x.float()
    if input_scale is None:
        x_scale = (xf.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp(min=1e-8)
    else:
        x_scale = input_scale.float().reshape(1, 1)
    v = xf / x_scale
    x_q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-INT8_MAX, INT8_MAX)
    acc = (x_q.double() @ weight.double().t()).float()  # exact: integer products and sums below 2**53
    out = acc * x_scale * weight_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def w8a8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize x (M, K) to int8 (per token, or with a static ``input_scale``), multiply by the int8
    weight (N, K) with per-channel float32 ``weight_scale`` (N,), add ``bias``; (M, N) in x's dtype."""
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"w8a8_matmul: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match")
    tensors = [t for t in (x, weight, weight_scale, bias, input_scale) if t is not None]
    if not use_triton(*tensors):
        return w8a8_matmul_ref(x, weight, weight_scale, bias, input_scale)
    m, k = x.shape
    n = weight.shape[0]
    block_m = 16 if m <= 16 else 64
    block_n, block_k = 64, 64
    x = x.contiguous()
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    scale = weight_scale.float().contiguous()
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w8a8_matmul_kernel[grid](
        x, weight.contiguous(), scale, input_scale.float().reshape(1) if input_scale is not None else scale,
        bias if bias is not None else scale, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        STATIC=input_scale is not None, HAS_BIAS=bias is not None, EMULATE=interpreting() and not x.is_cuda,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y
