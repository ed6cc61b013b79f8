"""End-to-end on the real SmolLM2-135M-Instruct: weight-only int4 by RTN and GPTQ (576-wide layers get a
partial last group at group 128), symmetric and asymmetric, quality on held-out text, real size, export to
compressed-tensors and a bit-exact reload."""

import copy

import pytest
import torch

import slmkit
from slmkit.quantize.linear import WeightOnlyLinear

pytestmark = pytest.mark.e2e
EVAL = slmkit.EvalConfig(max_tokens=2048, seq_len=512)


@pytest.fixture(scope="module")
def quantized(reference, calib):
    """W4A16 g128 by RTN (symmetric and asymmetric) and by GPTQ, each evaluated against the float model."""
    out = {}
    configs = {"rtn": slmkit.RTNConfig(group_size=128), "gptq": slmkit.GPTQConfig(group_size=128),
               "rtn-asym": slmkit.RTNConfig(group_size=128, symmetric=False)}
    for key, config in configs.items():
        model = copy.deepcopy(reference)
        slmkit.quantize(model, config, calib=calib)
        out[key] = (model, slmkit.evaluate(model, reference=reference, config=EVAL))
    return out


def _rise(report) -> float:
    return report.perplexity / report.reference_perplexity - 1


def test_int4_size_and_gptq_beats_rtn(quantized):
    model, gptq = quantized["gptq"]
    rtn = quantized["rtn"][1]
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, WeightOnlyLinear) and q_proj.weight_scale.shape == (576, 5)  # 4 full groups + 64
    assert q_proj.weight_packed.dtype == torch.uint8 and q_proj.weight_packed.shape == (576, 288)
    assert gptq.weight_bytes < 0.35 * gptq.reference_weight_bytes  # embeddings stay float32
    rtn_rise, gptq_rise = _rise(rtn), _rise(gptq)
    assert gptq_rise < 0.6 * rtn_rise, (rtn_rise, gptq_rise)
    assert gptq.top1_agreement > 0.7


def test_a_zero_point_per_group_halves_the_int4_rise(quantized):
    """An int8 zero point per group (0.06 bits/weight more at g128) fits the 16 codes to each group's own
    [min, max] instead of [-max|w|, max|w|]: on this model the perplexity rise falls by about half."""
    model, asym = quantized["rtn-asym"]
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight_zero_point.dtype == torch.int8 and q_proj.weight_zero_point.shape == (576, 5)
    assert _rise(asym) < 0.7 * _rise(quantized["rtn"][1]), (_rise(asym), _rise(quantized["rtn"][1]))


def test_export_and_reload_are_exact(quantized, tmp_path):
    model = quantized["gptq"][0]
    out = slmkit.export(model, tmp_path / "ct")
    loaded = slmkit.load_model(out)
    assert loaded.model.layers[3].self_attn.q_proj.group_size == 128  # 576 wide: written as g64, read back as g128
    tokens = slmkit.calib_data(model, n=1, seq_len=64, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
