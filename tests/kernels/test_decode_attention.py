"""Paged decode attention (flash-decoding) against the gathered reference, on the CPU interpreter."""

import pytest
import torch

from slmkit.kernels._launch import HAVE_TRITON
from slmkit.kernels.decode_attention import decode_attention, decode_attention_ref

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
CASES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 2e-2, 2e-2)]


def _paged(seq_lens, heads, kv_heads, dim, dtype, block_size=16, seed=0):
    """Random q and caches, each sequence's blocks scattered over the cache in a random order."""
    generator = torch.Generator().manual_seed(seed)
    max_blocks = -(-max(seq_lens) // block_size)
    num_blocks = len(seq_lens) * max_blocks + 3
    q = torch.randn(len(seq_lens), heads, dim, generator=generator).to(dtype)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(dtype)
    block_table = torch.randperm(num_blocks, generator=generator)[: len(seq_lens) * max_blocks]
    return q, k_cache, v_cache, block_table.view(len(seq_lens), max_blocks).int(), torch.tensor(seq_lens).int()


@pytest.mark.parametrize("dtype, atol, rtol", CASES)
@pytest.mark.parametrize("seq_lens, heads, kv_heads, dim", [
    ([1, 17, 100], 4, 2, 64),   # GQA; a 1-token context; partial last blocks
    ([64], 6, 1, 128),          # MQA, exactly 4 full blocks
    ([33, 5], 3, 3, 80),        # MHA, head dim padded
])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decode_attention_matches_reference(seq_lens, heads, kv_heads, dim, dtype, atol, rtol, num_splits):
    q, k_cache, v_cache, block_table, lengths = _paged(seq_lens, heads, kv_heads, dim, dtype)
    out = decode_attention(q, k_cache, v_cache, block_table, lengths, num_splits=num_splits)
    expected = decode_attention_ref(q, k_cache, v_cache, block_table, lengths)
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


def test_matches_the_last_row_of_prefill_attention():
    """Decoding token T attends like the last row of causal attention over the contiguous sequence."""
    from slmkit.kernels.attention import prefill_attention

    q, k_cache, v_cache, block_table, lengths = _paged([37], 4, 2, 64, torch.float32, seed=5)
    keys = k_cache[block_table[0].long()].flatten(0, 1)[:37]  # (T, Hkv, D)
    values = v_cache[block_table[0].long()].flatten(0, 1)[:37]
    queries = torch.randn(37, 4, 64, generator=torch.Generator().manual_seed(6))
    queries[-1] = q[0]
    full = prefill_attention(queries, keys, values, torch.tensor([0, 37], dtype=torch.int32))
    torch.testing.assert_close(decode_attention(q, k_cache, v_cache, block_table, lengths, num_splits=2)[0], full[-1],
                               atol=1e-5, rtol=1e-5)


def test_an_upper_bound_of_the_lengths_gives_the_same_output():
    """``max_seqlen`` (what a CUDA graph passes: the table's capacity) changes the launch, not the result."""
    q, k_cache, v_cache, block_table, lengths = _paged([3, 29, 17], 4, 2, 64, torch.float32, seed=7)
    capacity = block_table.shape[1] * k_cache.shape[1]
    torch.testing.assert_close(decode_attention(q, k_cache, v_cache, block_table, lengths, max_seqlen=capacity),
                               decode_attention_ref(q, k_cache, v_cache, block_table, lengths), atol=1e-5, rtol=1e-5)


def test_bad_inputs_fail_clearly():
    q, k_cache, v_cache, block_table, lengths = _paged([20], 4, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="fit the block table"):
        decode_attention(q, k_cache, v_cache, block_table, torch.tensor([33]).int())
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(q[:, :3], k_cache, v_cache, block_table, lengths)


@pytest.mark.parametrize("dtype, atol, rtol", CASES)
@pytest.mark.parametrize("softcap, window", [(6.0, 0), (0.0, 20), (3.0, 7), (0.0, 1)])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_softcapped_and_windowed_decode_matches_reference(dtype, atol, rtol, softcap, window, num_splits):
    # windows shorter than some contexts: whole splits and blocks fall before the window
    q, k_cache, v_cache, block_table, lengths = _paged([1, 17, 100], 4, 2, 64, dtype, seed=9)
    q = q * 3
    out = decode_attention(q, k_cache, v_cache, block_table, lengths, num_splits=num_splits, softcap=softcap,
                           window=window)
    expected = decode_attention_ref(q, k_cache, v_cache, block_table, lengths, softcap=softcap, window=window)
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


def test_windowed_decode_is_the_last_row_of_windowed_prefill():
    from slmkit.kernels.attention import prefill_attention_ref

    q, k_cache, v_cache, block_table, lengths = _paged([45], 4, 2, 64, torch.float32, seed=10)
    keys = k_cache[block_table[0].long()].flatten(0, 1)[:45]
    values = v_cache[block_table[0].long()].flatten(0, 1)[:45]
    queries = torch.randn(45, 4, 64, generator=torch.Generator().manual_seed(11))
    queries[-1] = q[0]
    full = prefill_attention_ref(queries, keys, values, torch.tensor([0, 45], dtype=torch.int32), softcap=4.0,
                                 window=13)
    got = decode_attention_ref(q, k_cache, v_cache, block_table, lengths, softcap=4.0, window=13)[0]
    torch.testing.assert_close(got, full[-1], atol=1e-5, rtol=1e-5)
