"""Quantized linear modules on a CUDA GPU dispatch to the Triton kernels and match their CPU path."""

import pytest
import torch

from slmkit.quantize.groupwise import group_params, quantize_codes
from slmkit.quantize.linear import W8A8Linear, WeightOnlyLinear

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("tokens", [1, 7, 300])  # kernel (split-K), kernel, dequantize + cuBLAS
def test_quantized_linears_on_cuda_match_the_cpu_path(tokens):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1536, 576, generator=generator)
    bias = torch.randn(1536, generator=generator)
    x = torch.randn(tokens, 576, generator=generator)
    scale, zero = group_params(weight, 4, 128, False)
    modules = [WeightOnlyLinear.from_codes(quantize_codes(weight, scale, zero, 4, 128), scale, zero, 4, 128, bias),
               W8A8Linear.from_float(weight, bias, "dynamic")]
    for module in modules:
        expected = module(x)
        out = module.cuda()(x.cuda().bfloat16())
        assert out.dtype == torch.bfloat16
        assert ((out.float().cpu() - expected).norm() / expected.norm()) < 2e-2
