"""Prefill attention, FlashAttention-2 style (Dao, 2023): variable-length sequences packed in one batch,
causal, GQA/MQA, fp16/bf16 (fp32 too, for tests).

    O_i = softmax(cap(Q_i K^T · scale) + causal mask) V        per sequence and query head

``cap`` is Gemma-2's logit soft-capping, softcap · tanh(s / softcap), when ``softcap`` > 0; a sliding
``window`` > 0 limits each query to its last ``window`` keys (itself included), as in Gemma-2's and
Qwen2's sliding-window layers.

Sequences are packed along the token axis, ``cu_seqlens`` (B + 1) giving where each starts. Keys may
be longer than queries (``cu_seqlens_k``): a chunk of new tokens attending to a cached prefix plus
itself, the causal mask aligned at the end (query i of Tq sees keys ≤ i + Tk − Tq). Query head h
reads key/value head ``h // (Hq / Hkv)``. One program computes a BLOCK_M block of queries of one
(sequence, head), streaming BLOCK_N blocks of keys with the online softmax (running max and sum in
float32), so the T × T score matrix never exists.
"""

from __future__ import annotations

import math

import torch

from slmkit.kernels._launch import HAVE_TRITON, interpreting, use_triton

LOG2E = 1.4426950408889634  # scores in log2 units: the kernels use exp2

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _softcap_log2(raw, softcap_scale, softcap_log2):
        """Soft-capped scores in log2 units from raw q·k: softcap · tanh(raw · scale / softcap) · log2(e),
        with tanh(x) = 2σ(2x) − 1 (``softcap_scale`` = scale / softcap, ``softcap_log2`` = softcap · log2(e))."""
        return (2.0 * tl.sigmoid(2.0 * raw * softcap_scale) - 1.0) * softcap_log2

    @triton.jit
    def _prefill_attention_kernel(Q, K, V, O, CU_SEQLENS, CU_SEQLENS_K, scale_log2, softcap_scale, softcap_log2,
                                  window, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                                  stride_ot, stride_oh, num_heads, group, head_dim,
                                  CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                  DOT_FP32: tl.constexpr):
        block_m = tl.program_id(0)
        sequence_head = tl.program_id(1)
        sequence = sequence_head // num_heads
        head = sequence_head % num_heads
        kv_head = head // group
        start = tl.load(CU_SEQLENS + sequence)
        length = tl.load(CU_SEQLENS + sequence + 1) - start
        start_k = tl.load(CU_SEQLENS_K + sequence)
        length_k = tl.load(CU_SEQLENS_K + sequence + 1) - start_k
        shift = length_k - length  # cached prefix before this chunk's first query
        if block_m * BLOCK_M < length:
            offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, BLOCK_D)
            d_mask = offs_d < head_dim
            q = tl.load(Q + (start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                        mask=(offs_m[:, None] < length) & d_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
            if DOT_FP32:
                q = q.to(tl.float32)
            running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            end = length_k
            if CAUSAL:
                end = tl.minimum((block_m + 1) * BLOCK_M + shift, length_k)
            begin = 0
            if WINDOW:  # key blocks wholly before the first query's window are skipped
                begin = tl.maximum(block_m * BLOCK_M + shift - window + 1, 0) // BLOCK_N * BLOCK_N
            for start_n in range(begin, end, BLOCK_N):
                keys = start_n + offs_n
                k = tl.load(K + (start_k + keys)[None, :] * stride_kt + kv_head * stride_kh + offs_d[:, None],
                            mask=(keys[None, :] < length_k) & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
                if DOT_FP32:
                    k = k.to(tl.float32)
                if SOFTCAP:
                    scores = _softcap_log2(tl.dot(q, k), softcap_scale, softcap_log2)
                else:
                    scores = tl.dot(q, k) * scale_log2  # (BLOCK_M, BLOCK_N), in log2 units
                valid = keys[None, :] < length_k
                if CAUSAL:
                    valid = valid & (offs_m[:, None] + shift >= keys[None, :])
                if WINDOW:
                    valid = valid & (offs_m[:, None] + shift - keys[None, :] < window)
                scores = tl.where(valid, scores, float("-inf"))
                new_max = tl.maximum(running_max, tl.max(scores, axis=1))
                new_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows past the end: no NaN
                p = tl.math.exp2(scores - new_max[:, None])
                correction = tl.math.exp2(running_max - new_max)
                running_sum = running_sum * correction + tl.sum(p, axis=1)
                v = tl.load(V + (start_k + keys)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                            mask=(keys[:, None] < length_k) & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
                if DOT_FP32:
                    v = v.to(tl.float32)
                acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v)
                running_max = new_max
            out = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
            tl.store(O + (start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                     out.to(O.dtype.element_ty), mask=(offs_m[:, None] < length) & d_mask[None, :])


def _check(q, k, v, cu_seqlens, cu_seqlens_k):
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3 or q.shape[2] != k.shape[2]:
        raise ValueError(f"attention: q must be (tokens, Hq, D) and k, v (tokens, Hkv, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if cu_seqlens.dim() != 1 or int(cu_seqlens[-1]) != q.shape[0] or int(cu_seqlens[0]) != 0:
        raise ValueError(f"attention: cu_seqlens must run from 0 to the token count {q.shape[0]}, got {cu_seqlens.tolist()}")
    if cu_seqlens_k.shape != cu_seqlens.shape or int(cu_seqlens_k[-1]) != k.shape[0] or int(cu_seqlens_k[0]) != 0:
        raise ValueError(f"attention: cu_seqlens_k must run from 0 to the key count {k.shape[0]} with one entry per "
                         f"cu_seqlens entry, got {cu_seqlens_k.tolist()}")
    if bool(((cu_seqlens_k[1:] - cu_seqlens_k[:-1]) < (cu_seqlens[1:] - cu_seqlens[:-1])).any()):
        raise ValueError("attention: every sequence needs at least as many keys as queries")


def _check_options(softcap: float, window: int) -> None:
    if softcap < 0 or window < 0:
        raise ValueError(f"attention: softcap and window must be >= 0 (0: off), got {softcap} and {window}")


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
                     softcap: float = 0.0) -> torch.Tensor:
    """Plain float32 attention of one sequence: q (Hq, Tq, D), k/v (Hkv, Tk, D), ``visible`` (Tq, Tk) or
    (B, 1, Tq, Tk) bool; logits soft-capped when ``softcap`` > 0. The reference of the capped and
    windowed kernels (SDPA has neither)."""
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.nan_to_num(weights) @ v  # a row that sees no key gives 0, as the kernels do


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                          causal: bool = True, scale: float | None = None,
                          cu_seqlens_k: torch.Tensor | None = None, softcap: float = 0.0, window: int = 0) -> torch.Tensor:
    """PyTorch reference of :func:`prefill_attention`: SDPA per sequence, in float32 (plain masked
    attention when ``softcap`` or ``window`` is set)."""
    cu_seqlens_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    _check(q, k, v, cu_seqlens, cu_seqlens_k)
    _check_options(softcap, window)
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty_like(q)
    bounds, bounds_k = cu_seqlens.tolist(), cu_seqlens_k.tolist()
    for start, end, start_k, end_k in zip(bounds, bounds[1:], bounds_k, bounds_k[1:]):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1).float()  # (Hq, Tq, D)
        ks = k[start_k:end_k].transpose(0, 1).float()  # (Hkv, Tk, D)
        vs = v[start_k:end_k].transpose(0, 1).float()
        shift = (end_k - start_k) - (end - start)
        if softcap or window:
            query_pos = torch.arange(end - start, device=q.device)[:, None] + shift  # key positions' frame
            distance = query_pos - torch.arange(end_k - start_k, device=q.device)[None, :]
            visible = torch.ones_like(distance, dtype=torch.bool)
            if causal:
                visible &= distance >= 0
            if window:
                visible &= distance < window
            out[start:end] = masked_attention(qs, ks, vs, visible, scale, softcap).transpose(0, 1).to(q.dtype)
            continue
        mask = None
        if causal and shift:  # aligned at the end: query i sees keys <= i + Tk - Tq
            mask = torch.ones(end - start, end_k - start_k, dtype=torch.bool, device=q.device).tril(shift)
        o = torch.nn.functional.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=mask, scale=scale,
                                                             is_causal=causal and not shift, enable_gqa=group > 1)
        out[start:end] = o[0].transpose(0, 1).to(q.dtype)  # 4-D inputs: SDPA's fused CPU kernel, not the math path
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int | None = None, causal: bool = True, scale: float | None = None,
                      cu_seqlens_k: torch.Tensor | None = None, softcap: float = 0.0, window: int = 0) -> torch.Tensor:
    """Attention over packed variable-length sequences: q (tokens, Hq, D), k/v (keys, Hkv, D) → (tokens, Hq, D).

    ``cu_seqlens``: int32 (B + 1) cumulative query lengths; ``max_seqlen``: the longest query run (computed
    when omitted); ``scale`` defaults to 1/√D. ``cu_seqlens_k`` (defaults to ``cu_seqlens``) gives key
    runs at least as long as the query runs: the queries are the last tokens of each key run (a new chunk
    after a cached prefix). ``softcap`` > 0 soft-caps the scaled logits (softcap · tanh(s / softcap));
    ``window`` > 0 lets a query see only its last ``window`` keys. Runs the Triton kernel on CUDA (or
    under ``TRITON_INTERPRET=1``).
    """
    cu_seqlens_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    _check(q, k, v, cu_seqlens, cu_seqlens_k)
    _check_options(softcap, window)
    if not use_triton(q, k, v):
        return prefill_attention_ref(q, k, v, cu_seqlens, causal, scale, cu_seqlens_k, softcap, window)
    tokens, heads, head_dim = q.shape
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    scale = (1.0 / math.sqrt(head_dim)) if scale is None else scale
    out = torch.empty_like(q)
    if tokens == 0 or max_seqlen == 0:
        return out
    # blocks: small in the CPU interpreter (speed), tensor-core friendly on GPUs (no autotune: see STYLE.md)
    block_m = 16 if interpreting() else 64
    block_n = 16 if interpreting() else (64 if head_dim <= 64 else 32)
    block_d = max(16, triton.next_power_of_2(head_dim))
    grid = (triton.cdiv(max_seqlen, block_m), (cu_seqlens.numel() - 1) * heads)
    _prefill_attention_kernel[grid](
        q, k, v, out, cu_seqlens.to(torch.int32), cu_seqlens_k.to(torch.int32), scale * LOG2E,  # exp2 instead of exp
        scale / softcap if softcap else 0.0, softcap * LOG2E, window,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        heads, heads // k.shape[1], head_dim, CAUSAL=causal, SOFTCAP=softcap > 0, WINDOW=window > 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        # the CPU interpreter's dot mishandles bfloat16 operands: it gets them in float32 (GPUs keep bf16)
        DOT_FP32=interpreting() and q.dtype == torch.bfloat16)
    return out
