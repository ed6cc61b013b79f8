"""Fused RMSNorm (+ residual) against its reference and transformers' norms, on the CPU interpreter."""

import pytest
import torch

from slmkit.kernels._launch import HAVE_TRITON
from slmkit.kernels.rmsnorm import rmsnorm, rmsnorm_ref

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
CASES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 2e-2, 2e-2)]


def _inputs(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=generator)).to(dtype)
    residual = torch.randn(shape, generator=generator).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=generator)).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("dtype, atol, rtol", CASES)
@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 64), (1, 576), (7, 1)])
def test_rmsnorm_matches_reference(shape, dtype, atol, rtol):
    x, residual, weight = _inputs(shape, dtype)
    torch.testing.assert_close(rmsnorm(x, weight, 1e-5), rmsnorm_ref(x, weight, 1e-5), atol=atol, rtol=rtol)
    y, h = rmsnorm(x, weight, 1e-5, residual=residual, weight_offset=1.0)
    y_ref, h_ref = rmsnorm_ref(x, weight, 1e-5, residual=residual, weight_offset=1.0)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(h, h_ref, atol=atol, rtol=rtol)
    assert y.dtype == dtype and y.shape == x.shape


def test_rmsnorm_matches_transformers_norms():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, _, weight = _inputs((3, 5, 96), torch.float32)
    llama = LlamaRMSNorm(96, eps=1e-6)
    gemma = GemmaRMSNorm(96, eps=1e-6)
    with torch.no_grad():
        llama.weight.copy_(weight)
        gemma.weight.copy_(weight - 1)  # Gemma scales by (1 + weight)
        torch.testing.assert_close(rmsnorm(x, weight, 1e-6), llama(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rmsnorm(x, weight - 1, 1e-6, weight_offset=1.0), gemma(x), atol=1e-5, rtol=1e-5)


def test_non_contiguous_rows_and_bad_shapes():
    x, _, weight = _inputs((6, 40), torch.float32)
    strided = x[::2]  # rows 0, 2, 4: row stride 80
    torch.testing.assert_close(rmsnorm(strided, weight), rmsnorm_ref(strided, weight))
    with pytest.raises(ValueError, match="do not match"):
        rmsnorm(x, weight[:-1])
