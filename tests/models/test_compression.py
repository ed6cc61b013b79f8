"""Bitmask storage of sparse tensors: exact round trip, and smaller only when it pays."""

import torch

from slmkit.models import compression


def test_pack_unpack_bits_round_trip():
    flags = torch.rand(37, generator=torch.Generator().manual_seed(0)) > 0.5
    bits = compression.pack_bits(flags)
    assert bits.dtype == torch.uint8 and bits.numel() == 5
    assert torch.equal(compression.unpack_bits(bits, 37), flags)


def test_compress_decompress_is_exact_for_each_dtype():
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int8):
        dense = (torch.randn(64, 128, generator=gen) * 50).to(dtype)
        dense[torch.rand(64, 128, generator=gen) < 0.6] = 0
        values, bitmask = compression.compress(dense)
        restored = compression.decompress(values, bitmask, dense.shape)
        assert restored.dtype == dtype and torch.equal(restored, dense)


def test_should_compress_only_sparse_large_tensors():
    dense = torch.randn(128, 128)
    assert not compression.should_compress(dense)
    sparse = dense.clone()
    sparse[:, ::2] = 0
    assert compression.should_compress(sparse)
    assert compression.bitmask_bytes(sparse) < 0.55 * sparse.numel() * 4
    assert not compression.should_compress(sparse[:8, :8].contiguous())  # too small to bother
