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
