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


@pytest.mark.parametrize("m", [1, 16, 100, 512])
@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 128, True), (4, 64, False), (8, None, True)])
def test_quantized_matmuls_on_cuda(m, bits, group_size, symmetric):
    from slmkit.kernels.w8a8_matmul import w8a8_matmul, w8a8_matmul_ref
    from slmkit.kernels.wo_matmul import wo_matmul, wo_matmul_ref
    from slmkit.quantize.groupwise import group_params, pack_int4, quantize_codes
    from slmkit.quantize.linear import quantize_per_channel

    generator = torch.Generator(device="cuda").manual_seed(0)
    n, k = 1536, 576  # SmolLM2's gate/up: 576 is not a multiple of 128 (a partial last group)
    weight = torch.randn(n, k, device="cuda", generator=generator)
    x = torch.randn(m, k, device="cuda", generator=generator).to(torch.bfloat16)
    scale, zero = group_params(weight, bits, group_size, symmetric)
    codes = quantize_codes(weight, scale, zero, bits, group_size)
    packed = pack_int4(codes) if bits == 4 else codes
    out = wo_matmul(x, packed, scale, zero, bits, group_size, k)
    ref = wo_matmul_ref(x, packed, scale, zero, bits, group_size, k)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
    q, s = quantize_per_channel(weight)
    out, ref = w8a8_matmul(x, q, s), w8a8_matmul_ref(x, q, s)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
