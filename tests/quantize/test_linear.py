import pytest
import torch

from slmkit.quantize import linear
from slmkit.quantize.linear import W8A8Linear


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return (10 * torch.log10(reference.pow(2).sum() / (reference - approx).pow(2).sum())).item()


def test_per_channel_quantizer_is_exact():
    torch.manual_seed(0)
    weight = torch.randn(7, 13)
    q, scale = linear.quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scale.shape == (7,)
    expected_scale = weight.abs().amax(dim=1) / 127
    assert torch.equal(scale, expected_scale)
    assert torch.equal(q, torch.round(weight / expected_scale[:, None]).to(torch.int8))
    assert q.abs().amax(dim=1).eq(127).all()  # every row uses the full range


def test_per_token_quantizer_handles_zero_rows():
    x = torch.zeros(3, 5)
    x[1] = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    q, scale = linear.quantize_per_token(x)
    assert torch.equal(q[0], torch.zeros(5, dtype=torch.int8))
    assert torch.isfinite(scale).all()
    assert q[1, 4] == 127


@pytest.mark.parametrize("m, k, n", [(1, 5, 3), (3, 577, 129), (17, 64, 8), (33, 96, 40)])
def test_int8_matmul_matches_reference(m, k, n):
    generator = torch.Generator().manual_seed(m * k * n)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=generator)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    assert torch.equal(linear.int8_matmul(a, b), linear.int8_matmul_ref(a, b))


@pytest.mark.parametrize("act_quant", ["dynamic", "static"])
@pytest.mark.parametrize("shape", [(5, 123, 77), (2, 3, 64, 32)])
def test_w8a8_linear_sqnr_floor(act_quant, shape):
    torch.manual_seed(0)
    *lead, in_features, out_features = shape
    float_linear = torch.nn.Linear(in_features, out_features)
    x = torch.randn(*lead, in_features)
    abs_max = x.reshape(-1, in_features).abs().amax(dim=0)
    module = W8A8Linear.from_float(float_linear.weight.data, float_linear.bias.data, act_quant, abs_max)
    assert module.weight.dtype == torch.int8
    out = module(x)
    assert out.shape == (*lead, out_features)
    assert sqnr_db(float_linear(x).detach(), out) > (30 if act_quant == "dynamic" else 25)


def test_static_needs_calibration():
    with pytest.raises(ValueError, match="input_abs_max"):
        W8A8Linear.from_float(torch.randn(4, 4), None, "static")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 17, 257])
def test_w8a8_linear_on_cuda_matches_cpu(m):
    torch.manual_seed(0)
    float_linear = torch.nn.Linear(576, 1536)
    x = torch.randn(m, 576)
    module = W8A8Linear.from_float(float_linear.weight.data, float_linear.bias.data, "dynamic")
    expected = module(x)
    got = module.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
