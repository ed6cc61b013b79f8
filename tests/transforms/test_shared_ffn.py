"""Shared FFN (MobiLLaMA) from a pretrained model: real parameter savings, exact surgery, each
initialisation, low-rank corrections, save/reload, the engine and distillation on the result, errors."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import slmkit
from slmkit.config import ConfigError
from slmkit.engine import Engine, EngineConfig, SamplingParams
from slmkit.errors import SlmkitError
from slmkit.eval.report import parameter_count
from slmkit.models.arch import blocks
from slmkit.models.checkpoint import WEIGHTS
from slmkit.transforms import SharedFFNConfig, build_model, transform
from slmkit.transforms.shared_ffn import low_rank_split
from tests.conftest import random_tokens, tiny_model

CALIB = random_tokens(4, 32, seed=7)
TOKENS = random_tokens(2, 12, seed=8)
FFN_PARAMS = 3 * 64 * 96  # gate, up, down of one tiny block (hidden 64, FFN 96)


def four_layer_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3.0)  # larger weights: greedy choices are not near-ties
    return model


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


def copy_ffn(model, source: int, target: int, noise: torch.Tensor | None = None):
    """Give block ``target`` block ``source``'s FFN weights (plus ``noise`` on gate_proj)."""
    with torch.no_grad():
        src, dst = blocks(model)[source].mlp, blocks(model)[target].mlp
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(dst, name).weight.copy_(getattr(src, name).weight)
        if noise is not None:
            dst.gate_proj.weight.add_(noise)


@pytest.mark.parametrize("init", ["important", "average", "merge"])
def test_each_init_shares_weights_once_and_reloads_exactly(init, tmp_path):
    model = four_layer_llama()
    before, original_bytes = parameter_count(model), None
    original_bytes = (slmkit.save(model, tmp_path / "original") / WEIGHTS).stat().st_size
    transform(model, SharedFFNConfig(group_size=2, init=init, merge_steps=20), calib=CALIB)
    assert type(model).__name__ == "SlmForCausalLM" and model.config.ffn_groups == [0, 0, 1, 1]
    assert parameter_count(model) == before - 2 * FFN_PARAMS  # 4 FFNs became 2
    layers = blocks(model)
    assert layers[0].mlp.gate_proj.shared is layers[1].mlp.gate_proj.shared is model.model.shared_mlps[0].gate_proj
    assert layers[2].mlp.down_proj.shared is not layers[1].mlp.down_proj.shared
    assert not any(".mlp." in name for name in model.state_dict())  # stored once, under model.shared_mlps
    path = slmkit.save(model, tmp_path / "shared")
    assert (path / WEIGHTS).stat().st_size < original_bytes - 2 * FFN_PARAMS * 4 * 0.99
    expected = logits(model)
    assert torch.equal(logits(slmkit.load_model(path)), expected)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(path).eval()), expected)
    groups = model.slmkit.metrics["shared_ffn"]["groups"]
    assert [g["layers"] for g in groups] == [[0, 1], [2, 3]]
    if init == "merge":
        assert all(g["error"] < g["error_start"] for g in groups)  # the merge fits the group better
    if init == "important":
        importance = model.slmkit.metrics["shared_ffn"]["importance"]
        assert groups[0]["source_layer"] == max([0, 1], key=lambda i: importance[i])


@pytest.mark.parametrize("init", ["important", "average", "merge"])
def test_identical_ffns_share_exactly(init):
    model = four_layer_llama()
    copy_ffn(model, 0, 1)
    copy_ffn(model, 2, 3)
    expected = logits(model)
    transform(model, SharedFFNConfig(group_size=2, init=init, merge_steps=5), calib=CALIB)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)


def test_low_rank_corrections_recover_a_low_rank_difference_exactly():
    model = four_layer_llama()
    generator = torch.Generator().manual_seed(3)
    difference = torch.randn(96, 3, generator=generator) @ torch.randn(3, 64, generator=generator)  # rank 3
    copy_ffn(model, 0, 1, noise=difference)
    expected = logits(model)
    before = parameter_count(model)
    transform(model, SharedFFNConfig(init="important", group_size=2, rank=4), calib=CALIB)
    corrections = 4 * 3 * 4 * (64 + 96)  # blocks × projections × rank × (in + out)
    assert parameter_count(model) == before - 2 * FFN_PARAMS + corrections
    out = logits(model)
    # group 0 (blocks 0, 1) is exact; group 1 (blocks 2, 3: unrelated FFNs) is not
    assert model.slmkit.metrics["shared_ffn"]["groups"][0]["error"] < 1e-8
    assert model.slmkit.metrics["shared_ffn"]["groups"][1]["error"] > 1e-3
    assert not torch.allclose(out, expected, atol=1e-3)


def test_low_rank_split_is_the_truncated_svd():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 5, generator=generator) @ torch.randn(5, 9, generator=generator)
    b, a = low_rank_split(delta, 5)
    assert b.shape == (12, 5) and a.shape == (5, 9)
    torch.testing.assert_close(b @ a, delta, rtol=1e-4, atol=1e-4)
    b2, a2 = low_rank_split(delta, 2)
    u, s, vh = torch.linalg.svd(delta)
    torch.testing.assert_close(b2 @ a2, (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-4)


def test_all_blocks_share_one_ffn_by_default():
    model = four_layer_llama()
    before = parameter_count(model)
    transform(model, SharedFFNConfig(init="average"), calib=CALIB)
    assert model.config.ffn_groups == [0, 0, 0, 0] and len(model.model.shared_mlps) == 1
    assert parameter_count(model) == before - 3 * FFN_PARAMS


def test_engine_runs_a_shared_ffn_model_like_generate():
    model = four_layer_llama()
    transform(model, SharedFFNConfig(group_size=2, init="average", rank=4), calib=CALIB)
    with torch.no_grad():  # non-zero corrections, so they take part in the check
        for block in blocks(model):
            block.mlp.up_proj.delta_b.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=8, max_batch_size=4))
    prompt = random_tokens(1, 9, seed=9)[0].tolist()
    out = engine.generate([prompt], SamplingParams(max_tokens=32), progress=False)[0]
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0,
                               temperature=None, top_p=None, top_k=None)[0, len(prompt):].tolist()
    assert out.token_ids == reference


def test_distillation_trains_shared_weights_and_corrections():
    teacher = four_layer_llama()
    student = copy.deepcopy(teacher)
    transform(student, SharedFFNConfig(group_size=2, init="average", rank=4), calib=CALIB)
    shared_before = student.model.shared_mlps[0].up_proj.weight.detach().clone()
    delta_before = blocks(student)[1].mlp.down_proj.delta_b.detach().clone()
    slmkit.distill(student, teacher, slmkit.DistillConfig(steps=6, batch_size=4, micro_batch_size=2,
                                                          learning_rate=3e-3, warmup_steps=1, eval_every=0),
                   data=random_tokens(16, 24, seed=1), eval_data=random_tokens(4, 24, seed=2))
    curve = [entry["kl"] for entry in student.slmkit.metrics["distill"]["evals"]]
    assert curve[-1] < curve[0]
    assert not torch.equal(student.model.shared_mlps[0].up_proj.weight, shared_before)
    assert not torch.equal(blocks(student)[1].mlp.down_proj.delta_b, delta_before)
    layers = blocks(student)
    assert layers[0].mlp.up_proj.shared is layers[1].mlp.up_proj.shared is student.model.shared_mlps[0].up_proj
    clone = copy.deepcopy(student)  # a copy shares within itself, not with the original
    assert blocks(clone)[1].mlp.up_proj.shared is clone.model.shared_mlps[0].up_proj
    assert clone.model.shared_mlps[0].up_proj is not student.model.shared_mlps[0].up_proj
    assert torch.equal(logits(clone), logits(student))


def test_build_model_makes_a_fresh_shared_design():
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2)
    model = build_model(config, SharedFFNConfig(group_size=3, rank=2), seed=1)
    assert model.config.ffn_groups == [0, 0, 0, 1, 1, 1] and len(model.model.shared_mlps) == 2
    dense = AutoModelForCausalLM.from_config(config)
    assert parameter_count(model) == parameter_count(dense) - 4 * FFN_PARAMS + 6 * 3 * 2 * (64 + 96)
    assert torch.isfinite(logits(model)).all()
    again = build_model(config, SharedFFNConfig(group_size=3, rank=2), seed=1)
    assert torch.equal(logits(again), logits(model))  # seeded


def test_build_model_reports_an_unreadable_base():
    with pytest.raises(SlmkitError, match="cannot read a model config"):
        build_model("/nonexistent/model-dir", SharedFFNConfig())


@pytest.mark.parametrize("config, message", [
    (SharedFFNConfig(group_size=3), "group_size 3 does not divide the model's 4 layers"),
    (SharedFFNConfig(rank=64), "rank 64 is not below the smallest projection dimension"),
])
def test_bad_grouping_fails_before_any_work(config, message):
    model = four_layer_llama()
    expected = logits(model)
    with pytest.raises(SlmkitError, match=message):
        transform(model, config, calib=CALIB)
    assert torch.equal(logits(model), expected) and type(model).__name__ == "LlamaForCausalLM"


def test_unsupported_models_are_refused_clearly():
    from transformers import MixtralConfig

    moe = AutoModelForCausalLM.from_config(MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))
    with pytest.raises(SlmkitError, match="mixture of 4 experts"):
        transform(moe, SharedFFNConfig(), calib=CALIB)
    with pytest.raises(SlmkitError, match="needs a Llama-architecture model"):
        transform(tiny_model("qwen2"), SharedFFNConfig(), calib=CALIB)


def test_shared_models_refuse_a_second_share_and_later_pruning_or_quantization():
    model = four_layer_llama()
    transform(model, SharedFFNConfig(group_size=2, init="average"), calib=CALIB)
    with pytest.raises(SlmkitError, match="already share FFN weights"):
        transform(model, SharedFFNConfig(), calib=CALIB)
    with pytest.raises(SlmkitError, match="share FFN weights, which prune steps do not support"):
        slmkit.prune(model, slmkit.WandaConfig(sparsity=0.5), calib=CALIB)
    with pytest.raises(SlmkitError, match="share FFN weights, which quantize steps do not support"):
        slmkit.quantize(model, slmkit.SmoothQuantConfig(), calib=CALIB)


@pytest.mark.parametrize("fields, message", [
    ({"init": "mean"}, "init must be one of"),
    ({"rank": -1}, "rank must be in"),
    ({"group_size": 0}, "group_size must be in"),
    ({"merge_lr": 2.0}, "merge_lr must be in"),
])
def test_config_validation(fields, message):
    with pytest.raises(ConfigError, match=message):
        SharedFFNConfig.from_dict(fields)


def test_zero_corrections_save_in_transformers_layout(tmp_path):
    """Zero-initialised corrections are not stored compressed: plain transformers reads them."""
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = build_model(config, SharedFFNConfig(rank=48)).eval()  # delta_b (96, 48): 4,608 zeros
    path = slmkit.save(model, tmp_path / "fresh")
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert torch.equal(logits(loaded), logits(model))
