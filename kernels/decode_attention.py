"""Decode attention against a paged KV cache, split over the KV length (flash-decoding, Dao et al. 2023).

One new query token per sequence attends to its whole cached context:

    o = softmax(cap(q K^T · scale)) V,   K, V gathered from cache blocks through the block table

with Gemma-2's soft-capping ``cap(s) = softcap · tanh(s / softcap)`` when ``softcap`` > 0, and only the
last ``window`` positions of the context when a sliding ``window`` > 0 is given.

The cache holds fixed-size blocks ``(num_blocks, block_size, Hkv, D)``; ``block_table[b, i]`` is the
physical block holding tokens ``[i·block_size, (i+1)·block_size)`` of sequence b. At small batch one
program per (sequence, head) would leave most of the GPU idle on long contexts, so the context is cut
into ``num_splits`` partitions processed in parallel (pass 1 keeps each partition's running max, sum
and unnormalized output) and merged by a combine kernel (pass 2) with the usual log-sum-exp rescaling.
"""

from __future__ import annotations

import math

import torch

from slmkit.kernels._launch import HAVE_TRITON, use_triton
from slmkit.kernels.attention import LOG2E, _check_options, masked_attention

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from slmkit.kernels.attention import _softcap_log2

    @triton.jit
    def _decode_attention_kernel(Q, K_CACHE, V_CACHE, BLOCK_TABLE, SEQ_LENS, PARTIAL_OUT, PARTIAL_MAX, PARTIAL_SUM,
                                 scale_log2, softcap_scale, softcap_log2, window,
                                 stride_qb, stride_qh, stride_kblock, stride_kt, stride_kh,
                                 stride_vblock, stride_vt, stride_vh, stride_table, num_heads, group, head_dim,
                                 blocks_per_split, num_splits, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                                 BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr):
        sequence = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        kv_head = head // group
        length = tl.load(SEQ_LENS + sequence)
        offs_d = tl.arange(0, BLOCK_D)
        offs_t = tl.arange(0, BLOCK_SIZE)
        d_mask = offs_d < head_dim
        q = tl.load(Q + sequence * stride_qb + head * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        running_max = float("-inf")
        running_sum = 0.0
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        first_block = split * blocks_per_split
        oldest = 0  # the first position the query sees
        if WINDOW:
            oldest = tl.maximum(length - window, 0)
        for logical in range(first_block, first_block + blocks_per_split):
            # blocks with at least one visible position (so a block's max is finite: no NaN)
            if (logical * BLOCK_SIZE < length) & ((logical + 1) * BLOCK_SIZE > oldest):
                physical = tl.load(BLOCK_TABLE + sequence * stride_table + logical)
                positions = logical * BLOCK_SIZE + offs_t
                t_mask = (positions < length) & (positions >= oldest)
                k = tl.load(K_CACHE + physical * stride_kblock + offs_t[:, None] * stride_kt + kv_head * stride_kh
                            + offs_d[None, :], mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
                if SOFTCAP:
                    scores = _softcap_log2(tl.sum(k * q[None, :], axis=1), softcap_scale, softcap_log2)
                else:
                    scores = tl.sum(k * q[None, :], axis=1) * scale_log2  # (BLOCK_SIZE,), log2 units
                scores = tl.where(t_mask, scores, float("-inf"))
                new_max = tl.maximum(running_max, tl.max(scores, axis=0))
                p = tl.math.exp2(scores - new_max)
                correction = tl.math.exp2(running_max - new_max)
                v = tl.load(V_CACHE + physical * stride_vblock + offs_t[:, None] * stride_vt + kv_head * stride_vh
                            + offs_d[None, :], mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
                acc = acc * correction + tl.sum(p[:, None] * v, axis=0)
                running_sum = running_sum * correction + tl.sum(p, axis=0)
                running_max = new_max
        slot = (sequence * num_heads + head) * num_splits + split
        tl.store(PARTIAL_OUT + slot * BLOCK_D + offs_d, acc)
        tl.store(PARTIAL_MAX + slot, running_max)
        tl.store(PARTIAL_SUM + slot, running_sum)

    @triton.jit
    def _decode_combine_kernel(PARTIAL_OUT, PARTIAL_MAX, PARTIAL_SUM, O, stride_ob, stride_oh, num_heads, head_dim,
                               num_splits, SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
        sequence = tl.program_id(0)
        head = tl.program_id(1)
        base = (sequence * num_heads + head) * num_splits
        offs_s = tl.arange(0, SPLITS)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < num_splits
        maxima = tl.load(PARTIAL_MAX + base + offs_s, mask=s_mask, other=float("-inf"))
        sums = tl.load(PARTIAL_SUM + base + offs_s, mask=s_mask, other=0.0)
        outs = tl.load(PARTIAL_OUT + (base + offs_s)[:, None] * BLOCK_D + offs_d[None, :], mask=s_mask[:, None],
                       other=0.0)  # (SPLITS, BLOCK_D)
        overall = tl.max(maxima, axis=0)
        weights = tl.where(maxima == float("-inf"), 0.0, tl.math.exp2(maxima - overall))  # empty splits weigh 0
        out = tl.sum(outs * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
        tl.store(O + sequence * stride_ob + head * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=offs_d < head_dim)


def _check(q, k_cache, v_cache, block_table, seq_lens, read_lengths=True):
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"decode_attention: q must be (B, Hq, D) and the caches (blocks, block_size, Hkv, D); got "
                         f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"decode_attention: {q.shape[1]} query heads are not a multiple of {k_cache.shape[2]} kv heads")
    if block_table.shape[0] != q.shape[0] or seq_lens.shape != (q.shape[0],):
        raise ValueError("decode_attention: block_table (B, max_blocks) and seq_lens (B,) must have the batch of q")
    if read_lengths and (int(seq_lens.min()) < 1 or int(seq_lens.max()) > block_table.shape[1] * k_cache.shape[1]):
        raise ValueError(f"decode_attention: sequence lengths {seq_lens.tolist()} must be ≥ 1 and fit the block table")


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float | None = None, softcap: float = 0.0,
                         window: int = 0) -> torch.Tensor:
    """PyTorch reference of :func:`decode_attention`, the whole batch at once: gather every row's blocks,
    mask the positions past its length (and before its window), one float32 SDPA call (GQA without
    repeating keys/values; plain masked attention when ``softcap`` is set).

    Also the engine's CPU decode path. Every block the table names must hold finite numbers (masked
    positions still enter the weighted sum, with weight 0)."""
    _check(q, k_cache, v_cache, block_table, seq_lens)
    _check_options(softcap, window)
    table = block_table.long()
    keys = k_cache[table].flatten(1, 2).transpose(1, 2).float()  # (B, Hkv, T, D), T = table width × block size
    values = v_cache[table].flatten(1, 2).transpose(1, 2).float()
    positions = torch.arange(keys.shape[2], device=q.device)[None, :]
    lengths = seq_lens[:, None].long()
    mask = positions < lengths  # (B, T)
    if window:
        mask &= positions >= lengths - window
    if softcap:
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        out = masked_attention(q[:, :, None, :].float(), keys, values, mask[:, None, None, :], scale, softcap)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None, :].float(), keys, values, attn_mask=mask[:, None, None, :], scale=scale,
            enable_gqa=q.shape[1] != keys.shape[1])
    return out[:, :, 0, :].to(q.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, num_splits: int | None = None, scale: float | None = None,
                     max_seqlen: int | None = None, softcap: float = 0.0, window: int = 0) -> torch.Tensor:
    """One query token per sequence against its paged context → (B, Hq, D).

    Args:
        q: (B, Hq, D). k_cache, v_cache: (num_blocks, block_size, Hkv, D); block_size a power of 2.
        block_table: int32 (B, max_blocks); seq_lens: int32 (B,) tokens of context (≥ 1).
        num_splits: KV partitions per (sequence, head); None picks enough to fill the GPU at small batch.
        max_seqlen: an upper bound of ``seq_lens``. Given, the launcher never reads ``seq_lens`` on the host,
            so the call can be captured in a CUDA graph (the engine passes the block table's capacity).
        softcap: > 0 soft-caps the scaled logits (softcap · tanh(s / softcap)); window: > 0 attends to the
            last ``window`` positions only.
    """
    _check(q, k_cache, v_cache, block_table, seq_lens, read_lengths=max_seqlen is None)
    _check_options(softcap, window)
    if not use_triton(q, k_cache, v_cache):
        return decode_attention_ref(q, k_cache, v_cache, block_table, seq_lens, scale, softcap, window)
    batch, heads, head_dim = q.shape
    block_size = k_cache.shape[1]
    if block_size & (block_size - 1):
        raise ValueError(f"decode_attention: block_size must be a power of 2, got {block_size}")
    max_blocks = -(-(int(seq_lens.max()) if max_seqlen is None else max_seqlen) // block_size)
    if num_splits is None:  # aim for ≥ 4 programs per SM-ish: 132 SMs on an H100
        num_splits = max(1, min(max_blocks, -(-528 // (batch * heads))))
    num_splits = max(1, min(num_splits, max_blocks))
    blocks_per_split = -(-max_blocks // num_splits)
    block_d = max(16, triton.next_power_of_2(head_dim))
    partial_out = torch.empty(batch, heads, num_splits, block_d, device=q.device, dtype=torch.float32)
    partial_max = torch.empty(batch, heads, num_splits, device=q.device, dtype=torch.float32)
    partial_sum = torch.empty_like(partial_max)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    table = block_table.to(torch.int32).contiguous()
    _decode_attention_kernel[(batch, heads, num_splits)](
        q, k_cache, v_cache, table, seq_lens.to(torch.int32).contiguous(), partial_out, partial_max, partial_sum,
        scale * LOG2E, scale / softcap if softcap else 0.0, softcap * LOG2E, window,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), table.stride(0), heads, heads // k_cache.shape[2],
        head_dim, blocks_per_split, num_splits, SOFTCAP=softcap > 0, WINDOW=window > 0,
        BLOCK_SIZE=block_size, BLOCK_D=block_d)
    out = torch.empty_like(q)
    _decode_combine_kernel[(batch, heads)](
        partial_out, partial_max, partial_sum, out, out.stride(0), out.stride(1), heads, head_dim, num_splits,
        SPLITS=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d)
    return out
