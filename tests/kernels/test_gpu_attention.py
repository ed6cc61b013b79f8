"""Prefill attention compiled for a real GPU against SDPA (skipped without CUDA)."""

import pytest
import torch

from slmkit.kernels.attention import prefill_attention, prefill_attention_ref

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_attention_on_cuda(dim, dtype):
    generator = torch.Generator(device="cuda").manual_seed(0)
    lengths = [1, 130, 517]
    tokens = sum(lengths)
    q = torch.randn(tokens, 8, dim, device="cuda", generator=generator).to(dtype)
    k = torch.randn(tokens, 2, dim, device="cuda", generator=generator).to(dtype)
    v = torch.randn(tokens, 2, dim, device="cuda", generator=generator).to(dtype)
    cu = torch.tensor([0, 1, 131, 648], device="cuda", dtype=torch.int32)
    out = prefill_attention(q, k, v, cu)
    ref = prefill_attention_ref(q, k, v, cu)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_on_cuda(dtype):
    from slmkit.kernels.decode_attention import decode_attention, decode_attention_ref

    generator = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(3, 8, 128, device="cuda", generator=generator).to(dtype)
    k_cache = torch.randn(200, 16, 2, 128, device="cuda", generator=generator).to(dtype)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(200, device="cuda", generator=generator)[:192].view(3, 64).int()
    lengths = torch.tensor([1, 500, 1024], device="cuda", dtype=torch.int32)
    out = decode_attention(q, k_cache, v_cache, table, lengths)
    ref = decode_attention_ref(q, k_cache, v_cache, table, lengths)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


@pytest.mark.parametrize("softcap, window", [(50.0, 0), (0.0, 100), (30.0, 257)])
def test_softcapped_and_windowed_attention_on_cuda(softcap, window):
    from slmkit.kernels.decode_attention import decode_attention, decode_attention_ref

    generator = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(648, 8, 128, device="cuda", generator=generator).bfloat16() * 4  # logits large enough to cap
    k = torch.randn(648, 2, 128, device="cuda", generator=generator).bfloat16()
    v = torch.randn(648, 2, 128, device="cuda", generator=generator).bfloat16()
    cu = torch.tensor([0, 1, 131, 648], device="cuda", dtype=torch.int32)
    out = prefill_attention(q, k, v, cu, softcap=softcap, window=window)
    ref = prefill_attention_ref(q, k, v, cu, softcap=softcap, window=window)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    k_cache = torch.randn(200, 16, 2, 128, device="cuda", generator=generator).bfloat16()
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(200, device="cuda", generator=generator)[:192].view(3, 64).int()
    lengths = torch.tensor([1, 500, 1024], device="cuda", dtype=torch.int32)
    out = decode_attention(q[:3], k_cache, v_cache, table, lengths, softcap=softcap, window=window)
    ref = decode_attention_ref(q[:3], k_cache, v_cache, table, lengths, softcap=softcap, window=window)
    assert not out.isnan().any()
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
