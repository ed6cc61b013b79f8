import copy

import pytest
import torch

import slmkit
from slmkit import calib as calibration
from slmkit.models import arch
from slmkit.quantize.linear import W8A8Linear
from slmkit.quantize.smoothquant import (FOLD_SITES, SmoothQuantConfig, expand_heads, group_heads, smooth_block,
                                         smoothing_scales)
from tests.conftest import FAMILIES, random_tokens, tiny_model


def test_smoothing_scales_formula():
    act = torch.tensor([4.0, 1.0, 0.0])
    weight = torch.tensor([1.0, 4.0, 2.0])
    scales = smoothing_scales(act, weight, alpha=0.5)
    assert torch.allclose(scales[:2], torch.tensor([2.0, 0.5]))
    assert scales[2] == 1.0  # a channel that never fires is left alone


def test_head_grouping_round_trip():
    per_channel = torch.arange(24.0)  # 6 query heads of dim 4 sharing 2 kv heads (groups of 3)
    grouped = group_heads(per_channel, kv_group=3, head_dim=4)
    assert grouped.tolist() == [8, 9, 10, 11, 20, 21, 22, 23]
    expanded = expand_heads(grouped, kv_group=3, head_dim=4)
    assert expanded.shape == (24,) and expanded[:12].tolist() == [8, 9, 10, 11] * 3


def _smooth_only(model, tokens, alpha=0.5):
    """Run the layerwise walk applying smoothing but no quantization."""
    config = SmoothQuantConfig(alpha=alpha)
    for layer in calibration.layerwise(model, tokens, batch_size=2):
        linears = dict(arch.block_linears(model, layer.block))
        stats = calibration.input_abs_max(layer, linears)
        smooth_block(model, layer.block, stats, config)


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_alone_keeps_outputs(family):
    model = tiny_model(family)
    tokens = random_tokens(4, 16)
    with torch.no_grad():
        before = model(tokens).logits
    smoothed = copy.deepcopy(model)
    _smooth_only(smoothed, tokens)
    with torch.no_grad():
        after = smoothed(tokens).logits
    changed = any(not torch.equal(a, b) for a, b in zip(model.parameters(), smoothed.parameters()))
    assert changed, "smoothing changed no weight"
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_w8a8_every_family(family, activations):
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    tokens = random_tokens(4, 16)
    slmkit.quantize(model, SmoothQuantConfig(activations=activations), calib=tokens)
    quantized = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    assert len(quantized) == 2 * len(arch.get_spec(model).linear_names())
    assert all(m.weight.dtype == torch.int8 for m in quantized)
    assert model.slmkit.steps == [{"smoothquant": SmoothQuantConfig(activations=activations).to_dict()}]
    test_tokens = random_tokens(2, 16, seed=1)
    with torch.no_grad():
        ref_logits, logits = reference(test_tokens).logits, model(test_tokens).logits
    sqnr = 10 * torch.log10(ref_logits.pow(2).sum() / (ref_logits - logits).pow(2).sum())
    assert sqnr > 20, f"logit SQNR {sqnr:.1f} dB"


def test_skip_regex_keeps_modules_float():
    model = tiny_model("llama")
    slmkit.quantize(model, SmoothQuantConfig(skip=[r"layers\.1\.", r"down_proj"]), calib=random_tokens(2, 8))
    assert isinstance(model.model.layers[0].self_attn.q_proj, W8A8Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, torch.nn.Linear)
    assert "model.layers.0.self_attn.q_proj" in model.slmkit.modules
    assert "model.layers.1.self_attn.q_proj" not in model.slmkit.modules


def _outlier_model():
    """A tiny llama whose norm outputs have a few huge channels, as real LLM activations do."""
    model = tiny_model("llama", seed=3)
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[[3, 17]] *= 60
            block.post_attention_layernorm.weight[[5, 40]] *= 60
    return model


def test_smoothing_beats_plain_w8a8_on_outliers():
    reference = _outlier_model()
    tokens, test_tokens = random_tokens(8, 32), random_tokens(4, 32, seed=9)
    errors = {}
    for smoothing in (False, True):
        model = copy.deepcopy(reference)
        slmkit.quantize(model, SmoothQuantConfig(smoothing=smoothing, fold_sites=list(FOLD_SITES)), calib=tokens)
        with torch.no_grad():
            errors[smoothing] = (model(test_tokens).logits - reference(test_tokens).logits).pow(2).mean().item()
    assert errors[True] < 0.5 * errors[False], errors


def test_quantize_refuses_wrong_category_and_config_type():
    from slmkit.config import ConfigError

    model = tiny_model("llama")
    with pytest.raises(ConfigError):
        slmkit.quantize(model, object())  # not a config


def test_alpha_search_picks_from_grid_and_beats_a_bad_fixed_alpha():
    reference = _outlier_model()
    tokens, test_tokens = random_tokens(8, 32), random_tokens(4, 32, seed=9)
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    searched = copy.deepcopy(reference)
    slmkit.quantize(searched, SmoothQuantConfig(alpha_grid=grid, search_tokens=64), calib=tokens)
    chosen = searched.slmkit.metrics["smoothquant_alpha"]
    assert set(chosen) == {"0", "1"}
    assert all(alpha in grid for site in chosen.values() for alpha in site.values())
    fixed = copy.deepcopy(reference)
    slmkit.quantize(fixed, SmoothQuantConfig(alpha=0.0), calib=tokens)
    with torch.no_grad():
        ref = reference(test_tokens).logits
        error = lambda m: (m(test_tokens).logits - ref).pow(2).mean().item()  # noqa: E731
        assert error(searched) < error(fixed)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_search_inputs_are_the_first_sequences_of_the_batch(family):
    from slmkit.quantize.smoothquant import block_search_inputs

    model = tiny_model(family)
    layer = next(calibration.layerwise(model, random_tokens(4, 24, seed=2), batch_size=4))
    with torch.no_grad():
        full = calibration.run_block(layer.block, layer.hidden_states[0], layer.extra_args[0], layer.kwargs[0])
        inputs = block_search_inputs(layer, 48)  # two whole 24-token sequences
        assert inputs[0].shape[0] == 2
        torch.testing.assert_close(calibration.run_block(layer.block, *inputs), full[:2], rtol=1e-5, atol=1e-5)
        assert block_search_inputs(layer, 10_000)[0].shape[0] == 4


def test_block_objective_search_restores_the_block_and_lowers_its_output_error():
    from slmkit.quantize.smoothquant import block_search_inputs, search_alphas_by_block_output

    model = _outlier_model()
    config = SmoothQuantConfig(alpha_grid=[0.0, 0.25, 0.5, 0.75, 1.0], search_tokens=64, search_objective="block")
    layer = next(calibration.layerwise(model, random_tokens(8, 32), batch_size=8))
    linears = dict(arch.block_linears(model, layer.block))
    stats = calibration.observe_inputs(layer, linears, calibration.combine(
        calibration.abs_max_reduce, calibration.row_sampler(64, 8 * 32)))
    abs_max, samples = {n: s[0] for n, s in stats.items()}, {n: s[1] for n, s in stats.items()}
    before = {k: v.clone() for k, v in layer.block.state_dict().items()}
    alphas = search_alphas_by_block_output(model, layer, abs_max, samples, config)
    after = layer.block.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert set(alphas) == set(FOLD_SITES) and all(a in config.alpha_grid for a in alphas.values())
    inputs = block_search_inputs(layer, 64)

    def block_error(chosen):
        block = copy.deepcopy(layer.block)
        smodel = copy.deepcopy(model)
        arch.set_module(smodel, "model.layers.0", block)
        amax = dict(abs_max)
        with torch.no_grad():
            reference = calibration.run_block(block, *inputs).float()
            smooth_block(smodel, block, amax, SmoothQuantConfig(), alphas=chosen)
            for name, module in list(arch.block_linears(smodel, block)):
                arch.set_module(block, name, W8A8Linear.from_float(module.weight, module.bias, "dynamic"))
            return float((calibration.run_block(block, *inputs).float() - reference).pow(2).sum())

    linear_choice = SmoothQuantConfig(alpha_grid=config.alpha_grid, search_tokens=64)
    start = dict(abs_max)
    copy_model = copy.deepcopy(model)
    linear_alphas = smooth_block(copy_model, arch.blocks(copy_model)[0], start, linear_choice, samples)
    assert block_error(alphas) <= block_error(linear_alphas)
    assert block_error(alphas) < block_error({site: 0.0 for site in FOLD_SITES})


def test_block_objective_trials_score_the_block_quantize_block_makes_with_skips():
    from slmkit.quantize.smoothquant import block_search_inputs, quantize_block, trial_block_error

    model = _outlier_model()
    config = SmoothQuantConfig(skip=[r"q_proj", r"layers\.0\.mlp\.down_proj"], search_tokens=64)
    layer = next(calibration.layerwise(model, random_tokens(8, 32), batch_size=8))
    stats = calibration.observe_inputs(layer, dict(arch.block_linears(model, layer.block)),
                                       calibration.abs_max_reduce)
    inputs = block_search_inputs(layer, 64)
    alphas = {site: 0.75 for site in FOLD_SITES}
    with torch.no_grad():
        reference = calibration.run_block(layer.block, *inputs).float()
    trial = trial_block_error(model, layer, inputs, reference, stats, config, alphas)

    made = copy.deepcopy(model)  # the block the quantize step makes from the same choice
    block, abs_max = arch.blocks(made)[0], dict(stats)
    smooth_block(made, block, abs_max, config, alphas=alphas)
    targets = arch.block_targets(made, 0, block, config.skip)
    assert "self_attn.q_proj" not in targets and "mlp.down_proj" not in targets and "self_attn.k_proj" in targets
    layouts = quantize_block(block, "model.layers.0", targets, abs_max, config)
    assert sorted(layouts) == sorted(f"model.layers.0.{name}" for name in targets)
    with torch.no_grad():
        made_error = float((calibration.run_block(block, *inputs).float() - reference).pow(2).sum())
    assert trial == pytest.approx(made_error, rel=1e-5)
    # every linear quantized (what the trials scored before) is a different block, with a larger error
    everything = trial_block_error(model, layer, inputs, reference, stats, SmoothQuantConfig(), alphas)
    assert everything > 1.05 * made_error


def test_block_objective_end_to_end_beats_no_smoothing():
    reference = _outlier_model()
    tokens, test_tokens = random_tokens(8, 32), random_tokens(4, 32, seed=9)
    model = copy.deepcopy(reference)
    slmkit.quantize(model, SmoothQuantConfig(alpha_grid=[0.0, 0.5, 0.8], search_tokens=64, search_objective="block",
                                             weight_method="gptq"), calib=tokens)
    plain = copy.deepcopy(reference)
    slmkit.quantize(plain, SmoothQuantConfig(smoothing=False), calib=tokens)
    with torch.no_grad():
        ref = reference(test_tokens).logits
        error = lambda m: (m(test_tokens).logits - ref).pow(2).mean().item()  # noqa: E731
        assert error(model) < 0.5 * error(plain)
    chosen = model.slmkit.metrics["smoothquant_alpha"].values()
    assert all(a in (0.0, 0.5, 0.8) for site in chosen for a in site.values())


def test_search_objective_is_validated():
    from slmkit.config import ConfigError

    with pytest.raises(ConfigError, match="search_objective must be one of"):
        SmoothQuantConfig(search_objective="model")


def test_output_error_is_zero_for_exactly_representable_values():
    from slmkit.quantize.smoothquant import w8a8_output_error

    x = torch.tensor([[127.0, -64.0, 1.0]])
    weight = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]) * 127 / 127
    assert w8a8_output_error(x, weight, torch.ones(3), "dynamic") < 1e-3
    assert w8a8_output_error(torch.randn(16, 8), torch.randn(4, 8), torch.ones(8), "static") > 0


def test_quantizing_twice_is_a_clear_error():
    from slmkit.errors import SlmkitError

    model = tiny_model("llama")
    slmkit.quantize(model, SmoothQuantConfig(), calib=random_tokens(2, 8))
    with pytest.raises(SlmkitError, match=r"already quantized \(smoothquant\); quantizing twice is not supported"):
        slmkit.quantize(model, SmoothQuantConfig(), calib=random_tokens(2, 8))


def test_gptq_rounding_of_smoothed_int8_weights_lowers_the_error():
    reference = tiny_model("llama")
    calib = random_tokens(16, 64, seed=3)
    held_out = random_tokens(2, 48, seed=4)
    errors = {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(reference)
        slmkit.quantize(model, SmoothQuantConfig(alpha_grid=[0.3, 0.5, 0.7], weight_method=method), calib=calib)
        assert type(arch.blocks(model)[1].mlp.down_proj).__name__ == "W8A8Linear"
        with torch.no_grad():
            ref = reference(held_out).logits
            errors[method] = ((model(held_out).logits - ref).norm() / ref.norm()).item()
    assert errors["gptq"] < errors["rtn"], errors


def test_weight_method_is_validated():
    from slmkit.config import ConfigError

    with pytest.raises(ConfigError, match="weight_method must be one of"):
        SmoothQuantConfig(weight_method="awq")


def _sensitivity_by_full_forwards(model, tokens):
    """The definition layer_sensitivity computes faster: quantize one linear, run the whole model, KL."""
    result = {}
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=tokens, use_cache=False).logits.float(), dim=-1)
        for index, block in enumerate(arch.blocks(model)):
            for name, module in list(arch.block_linears(model, block)):
                arch.set_module(block, name, W8A8Linear.from_float(arch.weight_out_in(module), module.bias, "dynamic"))
                logits = torch.log_softmax(model(input_ids=tokens, use_cache=False).logits.float(), dim=-1)
                arch.set_module(block, name, module)
                kl = (reference.exp() * (reference - logits)).sum(-1).mean()
                result[f"{arch.get_spec(model).layers}.{index}.{name}"] = float(kl)
    return result


@pytest.mark.parametrize("family", FAMILIES)
def test_sensitivity_with_recorded_prefix_matches_full_forwards(family):
    from slmkit.quantize.smoothquant import layer_sensitivity

    model = tiny_model(family)
    tokens = random_tokens(2, 24, seed=5)
    with torch.no_grad():
        before = model(tokens).logits
    fast = layer_sensitivity(model, tokens)
    slow = _sensitivity_by_full_forwards(model, tokens)
    assert fast.keys() == slow.keys()
    assert all(abs(fast[p] - max(slow[p], 0.0)) <= 1e-5 + 1e-3 * slow[p] for p in slow), (fast, slow)
    assert max(slow.values()) > 0
    with torch.no_grad():  # every block is back in place and unchanged
        assert torch.equal(model(tokens).logits, before)
    assert not any(type(b).__name__ == "_RecordedOutput" for b in arch.blocks(model))


def test_mixed_precision_keeps_the_most_sensitive_linears_in_float_within_budget():
    from slmkit.quantize.smoothquant import keep_in_float, layer_sensitivity

    reference = tiny_model("llama")
    with torch.no_grad():  # an outlier input channel makes block 1's down_proj the hardest to quantize
        arch.blocks(reference)[1].mlp.down_proj.weight[:, 5] *= 40
    calib = random_tokens(8, 32, seed=3)
    sensitivity = layer_sensitivity(reference, calib[:2])
    assert len(sensitivity) == 14 and all(v >= 0 for v in sensitivity.values())
    sizes = {path: 1000 for path in sensitivity}
    assert keep_in_float({"a": 3.0, "b": 2.0, "c": 1.0}, {"a": 10, "b": 1, "c": 1}, 0.2) == ["b", "c"]
    assert keep_in_float(sensitivity, sizes, 0.0) == []
    model = copy.deepcopy(reference)
    slmkit.quantize(model, SmoothQuantConfig(float_budget=0.2, sensitivity_blocks=2), calib=calib)
    kept = model.slmkit.metrics["mixed_precision"]["kept_in_float"]
    assert kept and "model.layers.1.mlp.down_proj" in kept
    total = sum(m.in_features * m.out_features for b in arch.blocks(model) for _, m in arch.block_linears(model, b))
    floats = [(f"model.layers.{i}.{n}", m) for i, b in enumerate(arch.blocks(model)) for n, m in arch.block_linears(model, b)
              if isinstance(m, torch.nn.Linear)]
    assert sorted(p for p, _ in floats) == sorted(kept)
    assert sum(m.weight.numel() for _, m in floats) <= 0.2 * total
