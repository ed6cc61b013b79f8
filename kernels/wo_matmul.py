"""Weight-only quantized matmul (W4A16 / W8A16): ``y = x @ dequant(W)ᵀ + b`` with the dequantization
inside the GEMM, so the weight crosses memory as 4 or 8 bits a value.

Weights are integer codes (out, in) with one float16 scale (and optionally an int8 zero point) per
(row, group of ``group_size`` input columns); int4 codes are packed two a byte along the input
dimension (low nibble = even column, stored as ``q + 8``), see :mod:`slmkit.quantize.groupwise`.
Each K tile lies inside one group (``BLOCK_K`` divides the power-of-two group size), so the kernel
multiplies ``x`` by the raw codes (exact in bf16/fp16: |q| <= 128) and applies the group's scale to
the tile's partial sum in float32. A partial last group (width not a multiple of the group size) is
just a shorter tile.

Two launch shapes: for M > 16 a tiled GEMM; for M <= 16 (decode) split-K, where each program reduces
one slice of K and a second pass sums the float32 partials, so enough programs run to fill the GPU
when there are few output tiles.
"""

from __future__ import annotations

import functools

import torch

from slmkit.kernels._launch import HAVE_TRITON, interpreting, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _wo_matmul_kernel(X, W, S, Z, Y, M, N, K, GROUP, K_SPLIT, stride_xm, stride_wn, stride_sn,
                          stride_ym, stride_ys, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                          IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * K_SPLIT
        k_end = tl.minimum(k_start + K_SPLIT, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < k_end),
                        other=0.0)  # (BM, BK)
            w_mask = (rk[:, None] < k_end) & (rn[None, :] < N)
            if BITS == 4:
                byte = tl.load(W + rn[None, :] * stride_wn + rk[:, None] // 2, mask=w_mask, other=0x88).to(tl.int32)
                code = ((byte >> ((rk[:, None] % 2) * 4)) & 0xF) - 8  # (BK, BN)
            else:
                code = tl.load(W + rn[None, :] * stride_wn + rk[:, None], mask=w_mask, other=0).to(tl.int32)
            group = k0 // GROUP
            if HAS_ZERO:
                zero = tl.load(Z + rn * stride_sn + group, mask=rn < N, other=0).to(tl.int32)
                code = tl.where(w_mask, code - zero[None, :], 0)
            scale = tl.load(S + rn * stride_sn + group, mask=rn < N, other=0.0).to(tl.float32)  # (BN,)
            if IEEE:  # float32 inputs, or the CPU interpreter (its bf16 dot is wrong): exact float32 dot
                part = tl.dot(x.to(tl.float32), code.to(tl.float32), input_precision="ieee")
            else:  # codes are exact in bf16/fp16
                part = tl.dot(x, code.to(x.dtype))
            acc += part * scale[None, :]
        out = Y + pid_k * stride_ys + rm[:, None] * stride_ym + rn[None, :]
        tl.store(out, acc.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def wo_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  bits: int, group_size: int | None, in_features: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of :func:`wo_matmul`: dequantize the weight, then a float32 matmul."""
    # Imported here: slmkit.quantize's package import loads the linear modules, which import this file.
    from slmkit.quantize.groupwise import dequantize, unpack_int4

    codes = unpack_int4(packed, in_features) if bits == 4 else packed
    weight = dequantize(codes, scale, zero, group_size)  # (N, K) float32
    out = x.float() @ weight.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _block_k(group: int) -> int:
    return min(64, group)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def wo_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              bits: int, group_size: int | None, in_features: int, bias: torch.Tensor | None = None,
              split_k: int | None = None) -> torch.Tensor:
    """``x @ dequant(W)ᵀ + bias`` for x (M, K) float and an int4/int8 weight (N, K); returns (M, N) in x's dtype.

    Args:
        packed: uint8 (N, ceil(K/2)) for ``bits=4``, int8 (N, K) for ``bits=8``.
        scale: float16 (N, G) group scales; zero: int8 (N, G) zero points or None (symmetric).
        group_size: a power of two >= 16, or None for one group per row.
        split_k: slices of K reduced in parallel (default: chosen from M, N and the GPU size).
    """
    if x.ndim != 2 or x.shape[1] != in_features:
        raise ValueError(f"wo_matmul: x must be (M, {in_features}), got {tuple(x.shape)}")
    if group_size is not None and (group_size < 16 or group_size & (group_size - 1)):
        raise ValueError(f"wo_matmul: group_size must be a power of two >= 16, got {group_size}")
    tensors = [t for t in (x, packed, scale, zero, bias) if t is not None]
    if not use_triton(*tensors):
        return wo_matmul_ref(x, packed, scale, zero, bits, group_size, in_features, bias)
    m, k = x.shape
    n = packed.shape[0]
    group = group_size or k
    block_k = _block_k(group)
    if m <= 16:
        block_m, block_n = 16, 64
        if split_k is None:
            tiles = triton.cdiv(n, block_n)
            split_k = max(1, min(triton.cdiv(k, 4 * block_k), triton.cdiv(2 * _sm_count(x.device), tiles)))
    else:
        block_m, block_n = 64, 64
        split_k = split_k or 1
    k_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k  # whole tiles per slice
    split_k = triton.cdiv(k, k_split)
    x = x.contiguous()
    scale = scale.contiguous()
    partial_dtype = x.dtype if split_k == 1 else torch.float32
    out = torch.empty(split_k, m, n, device=x.device, dtype=partial_dtype)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _wo_matmul_kernel[grid](
        x, packed.contiguous(), scale, zero.contiguous() if zero is not None else scale, out, m, n, k, group,
        k_split, x.stride(0), packed.stride(0), scale.stride(0), out.stride(1), out.stride(0),
        BITS=bits, HAS_ZERO=zero is not None, IEEE=x.dtype == torch.float32 or interpreting(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    result = out[0] if split_k == 1 else out.sum(dim=0)
    if bias is not None:
        result = result + bias.to(result.dtype)
    return result.to(x.dtype)
