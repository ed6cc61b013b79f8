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


@pytest.mark.parametrize("dtype, atol, rtol", CASES)
@pytest.mark.parametrize("softcap, window", [(8.0, 0), (0.0, 5), (4.0, 17), (0.0, 1)])
def test_softcapped_and_windowed_attention_matches_the_reference(dtype, atol, rtol, softcap, window):
    # lengths longer and shorter than the window; keys after a cached prefix in the second call
    q, k, v, cu_seqlens = _qkv([1, 19, 40], 4, 2, 64, dtype, seed=7)
    q = q * 3  # large logits, so the cap matters
    out = prefill_attention(q, k, v, cu_seqlens, softcap=softcap, window=window)
    expected = prefill_attention_ref(q, k, v, cu_seqlens, softcap=softcap, window=window)
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    rows = torch.cat([torch.arange(1), torch.arange(1 + 19 - 6, 20), torch.arange(60 - 9, 60)])  # last 1, 6, 9
    cu_q = torch.tensor([0, 1, 7, 16], dtype=torch.int32)
    chunk = prefill_attention(q[rows], k, v, cu_q, cu_seqlens_k=cu_seqlens, softcap=softcap, window=window)
    torch.testing.assert_close(chunk, expected[rows], atol=atol, rtol=rtol)


def test_softcap_and_window_reference_is_gemma2_eager_attention():
    """The reference computes what transformers' Gemma-2 attention computes (soft-capped logits, a
    sliding-window causal mask: a query sees keys q − window < k ≤ q)."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q, k, v, cu_seqlens = _qkv([24], 4, 2, 16, torch.float32, seed=8)
    window, softcap, scale = 6, 5.0, 0.3
    distance = torch.arange(24)[:, None] - torch.arange(24)[None, :]
    mask = torch.zeros(24, 24).masked_fill(~((distance >= 0) & (distance < window)), float("-inf"))

    class Module(torch.nn.Module):
        num_key_value_groups, training = 2, False

    expected, _ = eager_attention_forward(Module(), q.transpose(0, 1)[None] * 3, k.transpose(0, 1)[None],
                                          v.transpose(0, 1)[None], mask[None, None], dropout=0.0, scaling=scale,
                                          softcap=softcap)
    got = prefill_attention_ref(q * 3, k, v, cu_seqlens, scale=scale, softcap=softcap, window=window)
    torch.testing.assert_close(got, expected[0], atol=1e-5, rtol=1e-5)


def test_negative_softcap_or_window_is_refused():
    q, k, v, cu_seqlens = _qkv([4], 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="softcap and window must be >= 0"):
        prefill_attention(q, k, v, cu_seqlens, window=-1)
