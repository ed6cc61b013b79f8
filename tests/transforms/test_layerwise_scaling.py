"""OpenELM layer-wise scaling: the schedule, pruning a pretrained model to it, budgets, fresh models, errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import slmkit
from slmkit.config import ConfigError
from slmkit.errors import SlmkitError
from slmkit.eval.report import parameter_count
from slmkit.models.arch import attention_shape, blocks, intermediate_size
from slmkit.prune.structured import config_params
from slmkit.transforms import LayerwiseScalingConfig, build_model, transform
from slmkit.transforms.layerwise_scaling import linear_schedule, schedule_plan
from tests.conftest import random_tokens

CALIB = random_tokens(4, 32, seed=7)
TOKENS = random_tokens(2, 12, seed=8)
# SmolLM2-135M's shape: 30 blocks, hidden 576, 9 query heads of 64 in 3 key/value groups, FFN 1536
SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


def six_layer_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def test_linear_schedule_runs_from_min_to_max():
    assert linear_schedule(0.5, 1.0, 3) == [0.5, 0.75, 1.0]
    assert linear_schedule(0.5, 1.0, 1) == [0.5]


def test_openelm_schedule_on_smollm2_shape_rounds_heads_to_whole_groups():
    plan = schedule_plan(SMOLLM2, LayerwiseScalingConfig(alpha_min=0.5, alpha_max=1.0, beta_min=0.5, beta_max=2.5))
    assert plan.heads[0] == 6 and plan.heads[-1] == 9  # 4.5 heads → 2 groups of 3; 9 heads → 3 groups
    assert all(h == 3 * kv for h, kv in zip(plan.heads, plan.kv_heads))
    assert plan.heads == sorted(plan.heads) and plan.ffn == sorted(plan.ffn)
    assert plan.ffn[0] == 320 and plan.ffn[-1] == 1472  # 0.5 · 576 = 288 → 320; 2.5 · 576 = 1440 → 1472
    assert all(width % 64 == 0 for width in plan.ffn)
    query = schedule_plan(SMOLLM2, LayerwiseScalingConfig(alpha_min=0.5, beta_max=2.5, head_unit="query"))
    assert query.kv_heads == [3] * 30 and query.heads[0] == 6  # 4.5 heads → 2 per key/value head


def test_pretrained_model_is_pruned_to_the_schedule_and_reloads(tmp_path):
    model = six_layer_llama()
    before = parameter_count(model)
    config = LayerwiseScalingConfig(alpha_min=0.5, alpha_max=1.0, beta_min=1.0, beta_max=2.0, multiple_of=16)
    transform(model, config, calib=CALIB)
    assert type(model).__name__ == "SlmForCausalLM"
    heads = [attention_shape(model.config, i).num_heads for i in range(6)]
    ffn = [intermediate_size(model.config, i) for i in range(6)]
    assert heads == [4, 4, 6, 6, 8, 8]  # alpha · 64 / 8 heads = 4, 4.8, 5.6, 6.4, 7.2, 8 in groups of 2
    assert ffn == [64, 80, 96, 96, 112, 128]
    assert [blocks(model)[i].mlp.up_proj.weight.shape[0] for i in range(6)] == ffn
    assert parameter_count(model) < before
    assert model.slmkit.metrics["layerwise_scaling"]["ffn"] == ffn
    path = slmkit.save(model, tmp_path / "out")
    expected = logits(model)
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(path).eval()), expected, atol=1e-5)
    assert torch.allclose(logits(slmkit.load_model(path)), expected, atol=1e-5)


def test_param_budget_scales_the_ffn_range_to_fit():
    model = six_layer_llama()
    total = parameter_count(model)
    config = LayerwiseScalingConfig(alpha_min=1.0, alpha_max=1.0, beta_min=0.5, beta_max=2.0, multiple_of=8,
                                    param_budget=0.7)  # the schedule as given keeps 78%
    transform(model, config, calib=CALIB)
    params = parameter_count(model)
    assert 0.67 * total < params <= 0.7 * total
    ffn = [intermediate_size(model.config, i) for i in range(6)]
    assert ffn == sorted(ffn) and ffn[0] < ffn[-1] <= 128
    assert 0 < model.slmkit.metrics["layerwise_scaling"]["beta_scale"] < 1


def test_fresh_model_follows_the_schedule_and_budget():
    fresh = build_model(SMOLLM2, LayerwiseScalingConfig(param_budget=0.5), seed=0)
    heads = fresh.config.layer_num_heads
    assert heads[0] == 6 and heads[-1] == 9
    assert parameter_count(fresh) <= 0.5 * config_params(SMOLLM2)
    grown = build_model(SMOLLM2, LayerwiseScalingConfig())  # OpenELM's FFN range: beyond the base's width
    assert grown.config.layer_intermediate_sizes[-1] == 2304  # 4 × 576


@pytest.mark.parametrize("config, message", [
    (LayerwiseScalingConfig(alpha_min=0.05), "rounds to no head"),
    (LayerwiseScalingConfig(beta_max=4.0), r"layer 3 would get 192 FFN channels but has 128.*lower beta_max to <= 2"),
    (LayerwiseScalingConfig(alpha_max=1.5, beta_max=2.0), r"layer 4 would get 10 heads \(5 key/value\) but has 8"),
    (LayerwiseScalingConfig(alpha_min=1.0, beta_max=2.0, param_budget=0.2), "cannot be reached"),
])
def test_impossible_schedules_fail_before_any_work(config, message):
    model = six_layer_llama()
    expected = logits(model)
    with pytest.raises(SlmkitError, match=message):
        transform(model, config, calib=CALIB)
    assert torch.equal(logits(model), expected) and type(model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("fields, message", [
    ({"alpha_min": 1.0, "alpha_max": 0.5}, "need 0 < alpha_min <= alpha_max"),
    ({"beta_min": 0.0}, "need 0 < beta_min <= beta_max"),
    ({"param_budget": 1.0}, "param_budget must be a fraction"),
    ({"head_unit": "head"}, "head_unit must be one of"),
])
def test_config_validation(fields, message):
    with pytest.raises(ConfigError, match=message):
        LayerwiseScalingConfig.from_dict(fields)
