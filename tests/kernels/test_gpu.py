"""The fused-op kernels compiled for a real GPU (skipped without CUDA; the CPU tests use the interpreter)."""

import pytest
import torch

from slmkit.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from slmkit.kernels.rotary import rotary, rotary_ref
from slmkit.kernels.swiglu import swiglu, swiglu_ref

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_ops_on_cuda(dtype):
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 4096, device="cuda", generator=generator).to(dtype)
    residual = torch.randn_like(x)
    weight = torch.rand(4096, device="cuda", generator=generator).to(dtype)
    torch.testing.assert_close(rmsnorm(x, weight, residual=residual), rmsnorm_ref(x, weight, residual=residual),
                               atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(swiglu(x, residual), swiglu_ref(x, residual), atol=2e-2, rtol=2e-2)
    q = torch.randn(2, 8, 33, 128, device="cuda", generator=generator).to(dtype)
    angles = torch.rand(2, 33, 64, device="cuda", generator=generator) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    torch.testing.assert_close(rotary(q, cos, sin), rotary_ref(q, cos, sin), atol=2e-2, rtol=2e-2)
