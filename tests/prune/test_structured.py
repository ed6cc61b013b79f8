"""Structured width and depth pruning: really smaller models, dead structures removed exactly, errors."""

import dataclasses

import pytest
import torch

import slmkit
from slmkit.config import ConfigError
from slmkit.errors import SlmkitError
from slmkit.eval.report import parameter_count
from slmkit.models.arch import attention_shape, blocks, intermediate_size
from slmkit.prune import DepthPruneConfig, WidthPruneConfig, prune
from slmkit.prune.structured import distribute, select_heads
from tests.conftest import FAMILIES, random_tokens, tiny_model

CALIB = random_tokens(4, 32, seed=7)
TOKENS = random_tokens(2, 12, seed=8)


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_ffn_width_pruning_every_family_reloads_as_standard_model(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    before, width = parameter_count(model), intermediate_size(model.config, 0)  # 96 (GPT-2: 4 * 64)
    prune(model, WidthPruneConfig(ffn=0.25), calib=CALIB)
    assert all(intermediate_size(model.config, i) == width * 3 // 4 for i in range(2))
    assert parameter_count(model) < before
    assert type(model).__name__ != "SlmForCausalLM"
    path = slmkit.save(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()  # plain transformers, no slmkit code
    assert torch.allclose(reloaded(TOKENS).logits, _logits(model), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "hunyuan", "ernie4_5"])
def test_heads_and_hidden_pruning_keep_config_consistent(family, tmp_path):
    model = tiny_model(family)
    prune(model, WidthPruneConfig(heads=0.5, hidden=0.25, head_unit="group"), calib=CALIB)
    shape = attention_shape(model.config)
    assert (shape.num_heads, shape.num_kv_heads) == (2, 1)
    assert model.config.hidden_size == 48
    assert model.model.embed_tokens.weight.shape == (256, 48)
    assert torch.isfinite(_logits(model)).all()
    loaded = slmkit.load_model(slmkit.save(model, tmp_path / "out"))
    assert torch.allclose(_logits(loaded), _logits(model), atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])  # explicit head_dim, post-norms (and q/k norms)
def test_gemma_head_pruning_reloads(family, tmp_path):
    model = tiny_model(family)
    prune(model, WidthPruneConfig(heads=0.5, head_unit="group"), calib=CALIB)
    shape = attention_shape(model.config)
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim) == (2, 1, 16)
    loaded = slmkit.load_model(slmkit.save(model, tmp_path / "out"))
    assert torch.allclose(_logits(loaded), _logits(model), atol=1e-5)


def test_dead_ffn_channels_and_kv_group_are_removed_exactly():
    model = tiny_model("llama")
    with torch.no_grad():
        for block in blocks(model):
            block.mlp.up_proj.weight[:24] = 0  # channels 0..23 never fire
            block.self_attn.v_proj.weight[16:] = 0  # kv head 1 (query heads 2, 3) outputs zeros
    reference = _logits(model)
    prune(model, WidthPruneConfig(ffn=0.25, heads=0.5, head_unit="group"), calib=CALIB)
    assert blocks(model)[0].mlp.up_proj.weight.shape[0] == 72
    assert blocks(model)[0].self_attn.k_proj.weight.shape[0] == 16
    assert torch.allclose(_logits(model), reference, atol=1e-5)


def test_query_unit_keeps_kv_heads_and_group_sizes():
    model = tiny_model("llama")  # 4 query heads, 2 kv heads: groups of 2
    prune(model, WidthPruneConfig(heads=0.5), calib=CALIB)
    shape = attention_shape(model.config)
    assert (shape.num_heads, shape.num_kv_heads) == (2, 2)
    assert blocks(model)[0].self_attn.num_key_value_groups == 1
    assert torch.isfinite(_logits(model)).all()


def test_select_heads_respects_groups():
    scores = torch.tensor([0.1, 0.9, 0.8, 0.2, 0.3, 0.4])  # 3 kv groups of 2 query heads
    heads, kv = select_heads(scores, num_kv=3, heads_keep=3, kv_keep=3)
    assert heads.tolist() == [1, 2, 5] and kv.tolist() == [0, 1, 2]
    heads, kv = select_heads(scores, num_kv=3, heads_keep=4, kv_keep=2)
    assert kv.tolist() == [0, 1] and heads.tolist() == [0, 1, 2, 3]


def test_distribute_keeps_one_unit_per_layer():
    kept = distribute([torch.tensor([1.0, 1.0]), torch.tensor([0.001, 5.0, 5.0])], removed=3, unit=[1, 1])
    assert sum(kept) == 2 and min(kept) >= 1


def test_per_layer_widths_become_slm_model_loadable_by_auto_class(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    with torch.no_grad():
        blocks(model)[1].mlp.up_proj.weight[:80] = 0  # layer 1's FFN is mostly dead: it should lose more
    prune(model, WidthPruneConfig(ffn=0.4, per_layer=True), calib=CALIB)
    assert type(model).__name__ == "SlmForCausalLM" and model.config.model_type == "slm"
    widths = model.config.layer_intermediate_sizes
    assert widths[1] < widths[0] and sum(widths) <= 2 * 96 - int(0.4 * 2 * 96) + 8
    reference = _logits(model)
    path = slmkit.save(model, tmp_path / "slm")
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()  # slm registered by `import slmkit`
    assert type(reloaded).__name__ == "SlmForCausalLM"
    assert torch.allclose(reloaded(TOKENS).logits, reference, atol=1e-5)
    generated = reloaded.generate(TOKENS[:1], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 16)


def test_param_budget_is_met():
    model = tiny_model("llama")
    before = parameter_count(model)
    prune(model, WidthPruneConfig(param_budget=0.75, budget_dims=["heads", "ffn", "hidden"]), calib=CALIB)
    assert 0.6 * before < parameter_count(model) <= 0.75 * before
    assert model.slmkit.metrics["width"]["params_after"] == parameter_count(model)


@pytest.mark.parametrize("budget, dims, at_least", [(0.9, ["heads", "ffn", "hidden"], 0.87),
                                                     (0.75, ["heads", "ffn", "hidden"], 0.745),
                                                     (0.9, ["heads", "ffn"], 0.895), (0.9, ["ffn"], 0.895)])
def test_param_budget_gives_back_what_rounding_overshot(budget, dims, at_least):
    from slmkit.bench.models import random_model
    from slmkit.prune.structured import plan_for_budget, planned_params

    # SmolLM2's shape (on the meta device: only sizes): 9 heads in 3 groups and a hidden size that must stay
    # a multiple of lcm(8, heads) = 72 make coarse steps; equal fractions alone landed at 84% for 90%
    model = random_model("random:smollm2-135m", "float32", "meta")
    total = parameter_count(model)
    plan, fractions = plan_for_budget(model, WidthPruneConfig(param_budget=budget, budget_dims=dims))
    assert at_least * total <= planned_params(model.config, plan) <= budget * total
    assert all(fractions[d] == 0 for d in ("heads", "ffn", "hidden") if d not in dims)
    if fractions["ffn"] > 0:  # one more FFN step (8 channels in every layer) would not fit
        wider = dataclasses.replace(plan, ffn=[width + 8 for width in plan.ffn])
        assert planned_params(model.config, wider) > budget * total


def test_taylor_importance_runs_and_finds_dead_channels():
    model = tiny_model("qwen2")
    with torch.no_grad():
        for block in blocks(model):
            block.mlp.up_proj.weight[:24] = 0
            block.mlp.gate_proj.weight[:24] = 0
    reference = _logits(model)
    prune(model, WidthPruneConfig(ffn=0.25, importance="taylor"), calib=CALIB)
    assert torch.allclose(_logits(model), reference, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def _sequence_losses(model, tokens):
    """Each sequence's mean next-token loss, in float64 (transformers' own loss is float32)."""
    with torch.no_grad():
        logits = model(input_ids=tokens).logits[:, :-1].double()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    return losses.mean(dim=1)


def test_taylor_scores_are_the_squared_loss_derivatives_of_scaling_each_structure():
    """Σ w·∂L_n/∂w over a structure is dL_n/dε when its weights are scaled by 1 + ε: the score is the sum
    over sequences of its square (checked by central differences in float64, independently of how the
    scores map structures to weights)."""
    from slmkit.prune.importance import taylor_scores

    model = tiny_model("llama", num_hidden_layers=2).double()  # 4 heads of 16 in 2 KV groups
    tokens = random_tokens(5, 12, seed=1)
    scores = taylor_scores(model, tokens, batch_size=2)  # batches of 2, 2 and 1 sequences
    mlp, attn = blocks(model)[1].mlp, blocks(model)[1].self_attn
    structures = {  # (score, [(weight, index along dim 0 or 1, dim)])
        "ffn channel 7 of layer 1": (scores.ffn[1][7], [(mlp.gate_proj.weight, 7, 0), (mlp.up_proj.weight, 7, 0),
                                                         (mlp.down_proj.weight, 7, 1)]),
        "head 2 of layer 1": (scores.heads[1][2], [(attn.q_proj.weight, slice(32, 48), 0),
                                                   (attn.o_proj.weight, slice(32, 48), 1)]),
        "hidden channel 3": (scores.hidden[3], [(model.model.embed_tokens.weight, 3, 1)] + [
            (module.weight, 3, 0 if name.endswith(("o_proj", "down_proj")) else 1)
            for name, module in model.model.layers.named_modules() if isinstance(module, torch.nn.Linear)]),
    }
    eps = 1e-2  # the float64 model still runs some pieces in float32: smaller steps are noise
    for what, (score, parts) in structures.items():
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                for weight, index, dim in parts:
                    (weight[index] if dim == 0 else weight[:, index]).mul_(1 + sign * eps)
            losses.append(_sequence_losses(model, tokens))
            with torch.no_grad():
                for weight, index, dim in parts:
                    (weight[index] if dim == 0 else weight[:, index]).div_(1 + sign * eps)
        derivatives = (losses[0] - losses[1]) / (2 * eps)  # (sequences,)
        assert derivatives.abs().min() > 1e-5, what  # structures that matter, so the check can fail
        assert float(score) == pytest.approx(float(derivatives.square().sum()), rel=2e-3), what


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])  # separate, fused gate_up + qkv, Conv1D
def test_taylor_scores_do_not_depend_on_the_batch_size(family):
    """Each sequence has its own backward pass; ``batch_size`` only sets how many are kept per file."""
    from slmkit.prune.importance import taylor_scores

    model = tiny_model(family, num_hidden_layers=2)
    tokens = random_tokens(6, 10, seed=2)
    whole, split = taylor_scores(model, tokens, batch_size=6), taylor_scores(model, tokens, batch_size=2)
    for a, b in zip(whole.heads + whole.ffn + [whole.hidden], split.heads + split.ffn + [split.hidden]):
        assert a.min() > 0
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("importance", ["block_influence", "loss"])
def test_depth_pruning_drops_the_identity_block(importance, tmp_path):
    from transformers import Qwen2Config, AutoModelForCausalLM

    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # block 2 adds nothing to the residual stream
        blocks(model)[2].self_attn.o_proj.weight.zero_()
        blocks(model)[2].mlp.down_proj.weight.zero_()
    reference = _logits(model)
    prune(model, DepthPruneConfig(num_blocks=1, importance=importance), calib=CALIB)
    assert model.config.num_hidden_layers == 3 and len(blocks(model)) == 3
    depth = model.slmkit.metrics["depth"]
    assert depth["scores"][2] == pytest.approx(0.0, abs=1e-6)  # the identity block changes nothing
    assert depth["removed_blocks"] == [min(range(4), key=depth["scores"].__getitem__)]
    if importance == "block_influence":  # 1 - cos >= 0, so the identity block is the one removed
        assert depth["removed_blocks"] == [2]
        assert torch.allclose(_logits(model), reference, atol=1e-5)
    assert [b.self_attn.layer_idx for b in blocks(model)] == [0, 1, 2]
    generated = model.generate(TOKENS[:1], max_new_tokens=4, do_sample=False)  # KV cache slots renumbered
    path = slmkit.save(model, tmp_path / "out", compress=False)  # block 2's zeroed weights stay dense
    assert torch.equal(AutoModelForCausalLM.from_pretrained(path).generate(TOKENS[:1], max_new_tokens=4,
                                                                          do_sample=False), generated)



@pytest.mark.parametrize("quant", [slmkit.RTNConfig(group_size=16), slmkit.SmoothQuantConfig()],
                         ids=["w4a16", "w8a8"])
def test_depth_pruning_a_quantized_model_saves_and_reloads(quant, tmp_path):
    # the quantized modules' recorded paths follow the renumbered blocks (they named removed or shifted
    # blocks, and reloading failed: "ModuleList has no attribute `2`")
    model = tiny_model("llama", num_hidden_layers=4)
    slmkit.quantize(model, quant, calib=CALIB)
    with torch.no_grad():  # block 0 adds nothing to the residual stream: it goes, and blocks 1-3 shift down
        blocks(model)[0].self_attn.o_proj.weight_scale.zero_()
        blocks(model)[0].mlp.down_proj.weight_scale.zero_()
    prune(model, DepthPruneConfig(num_blocks=1), calib=CALIB)
    assert model.slmkit.metrics["depth"]["removed_blocks"] == [0]
    layers = {path.split(".")[2] for path in model.slmkit.modules}
    assert layers == {"0", "1", "2"}
    expected = _logits(model)
    reloaded = slmkit.load_model(slmkit.save(model, tmp_path / "out"))
    assert type(blocks(reloaded)[2].mlp.down_proj) is type(blocks(model)[2].mlp.down_proj)
    assert torch.equal(_logits(reloaded), expected)


def test_errors_are_clear_and_early():
    with pytest.raises(ConfigError, match="remove every"):
        WidthPruneConfig(heads=1.0)
    with pytest.raises(ConfigError, match="not both"):
        WidthPruneConfig(ffn=0.2, param_budget=0.5)
    with pytest.raises(ConfigError, match="exactly one"):
        DepthPruneConfig()
    model = tiny_model("llama")
    with pytest.raises(SlmkitError, match="every attention head"):
        prune(model, WidthPruneConfig(heads=0.9), calib=CALIB)
    with pytest.raises(SlmkitError, match="not below the model"):
        prune(model, WidthPruneConfig(param_budget=10**9), calib=CALIB)
    with pytest.raises(SlmkitError, match="at least one must stay"):
        prune(model, DepthPruneConfig(num_blocks=2), calib=CALIB)
    with pytest.raises(SlmkitError, match="hidden is not supported for gpt2"):
        prune(tiny_model("gpt2"), WidthPruneConfig(hidden=0.25), calib=CALIB)
    with pytest.raises(SlmkitError, match="heads is not supported for qwen2"):
        prune(tiny_model("qwen2"), WidthPruneConfig(heads=0.5), calib=CALIB)
    with pytest.raises(SlmkitError, match="heads is not supported for smollm3"):
        prune(tiny_model("smollm3"), WidthPruneConfig(heads=0.5), calib=CALIB)
    with pytest.raises(SlmkitError, match="hidden is not supported for gemma3"):
        prune(tiny_model("gemma3"), WidthPruneConfig(hidden=0.25), calib=CALIB)
    with pytest.raises(SlmkitError, match="Llama-architecture"):
        prune(tiny_model("qwen2"), WidthPruneConfig(ffn=0.25, per_layer=True), calib=CALIB)
    assert len(blocks(model)) == 2 and intermediate_size(model.config, 0) == 96  # untouched
    quantized = slmkit.quantize(tiny_model("llama"), slmkit.SmoothQuantConfig(), calib=CALIB)
    with pytest.raises(SlmkitError, match="W8A8Linear, not a float linear; prune before quantizing"):
        prune(quantized, WidthPruneConfig(ffn=0.25), calib=CALIB)


def test_default_param_budget_shrinks_only_the_ffn():
    model = tiny_model("llama")
    before = parameter_count(model)
    prune(model, WidthPruneConfig(param_budget=0.8), calib=CALIB)
    assert parameter_count(model) <= 0.8 * before
    assert model.config.hidden_size == 64 and attention_shape(model.config).num_heads == 4
    assert intermediate_size(model.config, 0) < 96
