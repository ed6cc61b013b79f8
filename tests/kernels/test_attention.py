"""Prefill attention (varlen, causal, GQA/MQA) against SDPA per sequence, on the CPU interpreter."""

import pytest
import torch

from slmkit.kernels._launch import HAVE_TRITON
from slmkit.kernels.attention import prefill_attention, prefill_attention_ref

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
CASES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 2e-2, 2e-2)]


def _qkv(lengths, heads, kv_heads, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    q, k, v = (torch.randn(tokens, h, dim, generator=generator).to(dtype) for h in (heads, kv_heads, kv_heads))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu_seqlens


@pytest.mark.parametrize("dtype, atol, rtol", CASES)
@pytest.mark.parametrize("lengths, heads, kv_heads, dim", [
    ([1, 17, 40], 4, 2, 64),   # GQA, a one-token sequence, lengths not multiples of the blocks
    ([33], 6, 1, 128),         # MQA, head dim 128
    ([5, 0, 23], 3, 3, 80),    # MHA, an empty sequence, head dim padded to 128
])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_attention_matches_sdpa(lengths, heads, kv_heads, dim, dtype, atol, rtol, causal):
    q, k, v, cu_seqlens = _qkv(lengths, heads, kv_heads, dim, dtype)
    out = prefill_attention(q, k, v, cu_seqlens, causal=causal)
    torch.testing.assert_close(out, prefill_attention_ref(q, k, v, cu_seqlens, causal=causal), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", CASES[:2])
def test_a_chunk_after_a_cached_prefix_equals_the_last_rows_of_full_attention(dtype, atol, rtol):
    # three sequences with key runs 30, 7, 19 whose last 12, 7 (no prefix), 1 tokens are the queries
    key_lengths, query_lengths = [30, 7, 19], [12, 7, 1]
    q_full, k, v, cu_k = _qkv(key_lengths, 4, 2, 64, dtype, seed=3)
    rows = torch.cat([torch.arange(end - n, end) for end, n in zip(cu_k[1:].tolist(), query_lengths)])
    cu_q = torch.tensor([0, *torch.tensor(query_lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = prefill_attention(q_full[rows], k, v, cu_q, cu_seqlens_k=cu_k)
    full = prefill_attention_ref(q_full, k, v, cu_k)
    torch.testing.assert_close(out, full[rows], atol=atol, rtol=rtol)
    torch.testing.assert_close(prefill_attention_ref(q_full[rows], k, v, cu_q, cu_seqlens_k=cu_k), full[rows],
                               atol=atol, rtol=rtol)


def test_packed_sequences_do_not_see_each_other():
    q, k, v, cu_seqlens = _qkv([9, 12], 2, 1, 64, torch.float32)
    packed = prefill_attention(q, k, v, cu_seqlens)
    alone = prefill_attention(q[9:], k[9:], v[9:], torch.tensor([0, 12], dtype=torch.int32))
    torch.testing.assert_close(packed[9:], alone, atol=1e-6, rtol=1e-6)


def test_matches_a_transformers_attention_layer():
    """The kernel computes what SmolLM2-style Llama attention computes inside the model (GQA, causal)."""
    q, k, v, cu_seqlens = _qkv([20], 9, 3, 64, torch.float32, seed=4)
    # transformers' eager attention on (B, H, T, D) with repeated kv heads
    from transformers.models.llama.modeling_llama import repeat_kv

    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))
    scores = qh @ repeat_kv(kh, 3).transpose(-1, -2) / 8.0 + torch.full((20, 20), float("-inf")).triu(1)
    expected = (scores.softmax(-1) @ repeat_kv(vh, 3))[0].transpose(0, 1)
    torch.testing.assert_close(prefill_attention(q, k, v, cu_seqlens), expected, atol=2e-5, rtol=2e-5)


def test_bad_shapes_fail_clearly():
    q, k, v, cu_seqlens = _qkv([4], 3, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="not a multiple"):
        prefill_attention(q, k, v, cu_seqlens)
    q, k, v, cu_seqlens = _qkv([4], 4, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        prefill_attention(q, k, v, torch.tensor([0, 3], dtype=torch.int32))
