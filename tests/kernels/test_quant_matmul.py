"""W4A16/W8A16 (dequantize-in-GEMM) and fused W8A8 matmul kernels against their references, on the CPU
interpreter: odd shapes, partial last groups, both launch shapes (split-K for M <= 16), every dtype."""

import pytest
import torch

from slmkit.kernels._launch import HAVE_TRITON
from slmkit.kernels.w8a8_matmul import w8a8_matmul, w8a8_matmul_ref
from slmkit.kernels.wo_matmul import wo_matmul, wo_matmul_ref
from slmkit.quantize.groupwise import group_params, pack_int4, quantize_codes
from slmkit.quantize.linear import quantize_per_channel

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _relative_error(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _weight(n, k, bits, group_size, symmetric, seed=1):
    weight = _randn(n, k, seed=seed)
    scale, zero = group_params(weight, bits, group_size, symmetric)
    codes = quantize_codes(weight, scale, zero, bits, group_size)
    return (pack_int4(codes) if bits == 4 else codes), scale, zero


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 128, True), (4, 64, False), (4, 16, True),
                                                          (8, None, True), (8, 32, False)])
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weight_only_matmul_matches_reference(bits, group_size, symmetric, m, dtype):
    n, k = 70, 577  # odd width: a partial last group, and int4 rows ending in half a byte
    packed, scale, zero = _weight(n, k, bits, group_size, symmetric)
    x = _randn(m, k, seed=2).to(dtype)
    bias = _randn(n, seed=3).to(dtype)
    out = wo_matmul(x, packed, scale, zero, bits, group_size, k, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    assert _relative_error(out, wo_matmul_ref(x, packed, scale, zero, bits, group_size, k, bias)) < TOLERANCE[dtype]


@pytest.mark.parametrize("split_k", [1, 2, 5])
def test_weight_only_split_k_slices_sum_to_the_whole(split_k):
    packed, scale, zero = _weight(40, 300, 4, 32, False)
    x = _randn(3, 300, seed=4)
    out = wo_matmul(x, packed, scale, zero, 4, 32, 300, split_k=split_k)
    assert _relative_error(out, wo_matmul_ref(x, packed, scale, zero, 4, 32, 300)) < 1e-5


def test_weight_only_matmul_rejects_bad_input():
    packed, scale, zero = _weight(8, 64, 4, 16, True)
    with pytest.raises(ValueError, match="x must be"):
        wo_matmul(_randn(2, 60), packed, scale, zero, 4, 16, 64)
    with pytest.raises(ValueError, match="power of two"):
        wo_matmul(_randn(2, 64), packed, scale, zero, 4, 24, 64)


@pytest.mark.parametrize("m, k, n", [(1, 576, 96), (17, 100, 70), (64, 130, 65)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_matmul_matches_reference(m, k, n, dtype, static):
    weight, weight_scale = quantize_per_channel(_randn(n, k, seed=1))
    x = (3 * _randn(m, k, seed=2)).to(dtype)
    x[0, 3] = 40.0  # an outlier channel
    bias = _randn(n, seed=3).to(dtype)
    input_scale = torch.tensor(0.2) if static else None
    out = w8a8_matmul(x, weight, weight_scale, bias, input_scale)
    ref = w8a8_matmul_ref(x, weight, weight_scale, bias, input_scale)
    assert out.shape == (m, n) and out.dtype == dtype
    assert _relative_error(out, ref) < TOLERANCE[dtype]


def test_w8a8_reference_is_close_to_float():
    weight = _randn(64, 256, seed=1)
    x = _randn(9, 256, seed=2)
    q, scale = quantize_per_channel(weight)
    assert _relative_error(w8a8_matmul_ref(x, q, scale), x @ weight.t()) < 0.02
    with pytest.raises(ValueError, match="do not match"):
        w8a8_matmul(x[:, :100], q, scale)
