"""Magnitude, Wanda and SparseGPT on tiny models of every family: sparsity, N:M patterns, errors, storage."""

import copy

import pytest
import torch

import slmkit
from slmkit.config import ConfigError
from slmkit.errors import SlmkitError
from slmkit.models import compression
from slmkit.models.arch import block_linears, blocks, weight_out_in
from slmkit.prune import MagnitudePruneConfig, SparseGPTConfig, WandaConfig, linear_sparsity, prune, to_semi_structured
from slmkit.prune.masks import is_n_m_sparse
from tests.conftest import FAMILIES, random_tokens, tiny_model

METHODS = (MagnitudePruneConfig, WandaConfig, SparseGPTConfig)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS, ids=lambda c: c.name)
def test_unstructured_half_sparsity_every_linear(family, method):
    model = tiny_model(family)
    prune(model, method(sparsity=0.5), calib=random_tokens(4, 32))
    sparsity = linear_sparsity(model)
    for path, value in sparsity.items():
        assert abs(value - 0.5) < 0.02, (path, value)
    assert model.slmkit.steps == [{method.name: method(sparsity=0.5).to_dict()}]
    assert torch.isfinite(model(random_tokens(1, 8, seed=1)).logits).all()


@pytest.mark.parametrize("method", METHODS, ids=lambda c: c.name)
@pytest.mark.parametrize("n_m", ["2:4", "4:8"])
def test_n_m_pattern_holds(method, n_m):
    model = tiny_model("qwen2")
    prune(model, method(n_m=n_m), calib=random_tokens(4, 32))
    n, m = map(int, n_m.split(":"))
    for block in blocks(model):
        for name, module in block_linears(model, block):
            assert is_n_m_sparse(weight_out_in(module), n, m), name


def test_sparsegpt_gram_shrink_is_used_recorded_and_checked():
    reference = tiny_model("llama")
    logits = {}
    for amount in (0.0, 0.25):
        model = copy.deepcopy(reference)
        prune(model, SparseGPTConfig(n_m="2:4", gram_shrink=amount), calib=random_tokens(4, 32))
        assert model.slmkit.steps[-1]["sparsegpt"]["gram_shrink"] == amount
        with torch.no_grad():
            logits[amount] = model(random_tokens(1, 8, seed=1)).logits
    assert not torch.equal(logits[0.0], logits[0.25])
    with pytest.raises(ConfigError, match=r"gram_shrink must be in \[0.0, 1.0\]"):
        SparseGPTConfig(gram_shrink=-0.1)


def test_skip_leaves_modules_dense_and_lm_head_untouched():
    model = tiny_model("llama")
    head = model.lm_head.weight.clone()
    prune(model, WandaConfig(sparsity=0.5, skip=[r"\.0\.mlp\."]), calib=random_tokens(4, 32))
    sparsity = linear_sparsity(model)
    assert sparsity["model.layers.0.mlp.down_proj"] == 0.0
    assert sparsity["model.layers.1.mlp.down_proj"] == pytest.approx(0.5, abs=0.02)
    assert torch.equal(model.lm_head.weight, head)


def test_wanda_and_sparsegpt_beat_magnitude_on_output_error():
    """On a trained-like model with outlier input channels, activation-aware methods keep outputs closer."""
    tokens = random_tokens(8, 32, seed=2)
    reference = tiny_model("llama", seed=3)
    with torch.no_grad():  # outlier channels in the residual stream, as real LLMs have
        reference.model.embed_tokens.weight[:, :4] *= 20
    with torch.no_grad():
        logits = reference(tokens).logits
    errors = {}
    for method in METHODS:
        model = tiny_model("llama", seed=3)
        model.load_state_dict(reference.state_dict())
        prune(model, method(sparsity=0.5), calib=random_tokens(8, 32, seed=4))
        with torch.no_grad():
            errors[method.name] = float((model(tokens).logits - logits).pow(2).mean())
    assert errors["wanda"] < errors["magnitude"]
    assert errors["sparsegpt"] < errors["magnitude"]


def test_config_errors_before_any_work():
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0, 1\)"):
        WandaConfig(sparsity=1.0)
    with pytest.raises(ConfigError, match="sparsity must be in"):
        MagnitudePruneConfig(sparsity=-0.1)
    with pytest.raises(ConfigError, match="not both"):
        SparseGPTConfig(sparsity=0.5, n_m="2:4")
    with pytest.raises(ConfigError, match="0 < N < M"):
        WandaConfig(n_m="4:2")
    with pytest.raises(ConfigError, match="unknown key"):
        WandaConfig.from_dict({"sparsty": 0.5})
    model = tiny_model("llama")  # in_features 64 and 96 are not multiples of 5
    with pytest.raises(SlmkitError, match="divisible by 5"):
        prune(model, WandaConfig(n_m="2:5"), calib=random_tokens(2, 16))
    assert linear_sparsity(model)["total"] == 0.0  # nothing was touched
    with pytest.raises(ConfigError, match="prune step"):
        slmkit.quantize(model, WandaConfig())


def test_quantized_model_is_refused():
    model = tiny_model("llama")
    slmkit.quantize(model, slmkit.SmoothQuantConfig(), calib=random_tokens(2, 16))
    with pytest.raises(SlmkitError, match="prune before quantizing"):
        prune(model, MagnitudePruneConfig())


def test_sparse_checkpoint_is_smaller_and_round_trips(tmp_path):
    model = tiny_model("llama")
    dense_path = slmkit.save(model, tmp_path / "dense")
    prune(model, SparseGPTConfig(n_m="2:4"), calib=random_tokens(4, 32))
    sparse_path = slmkit.save(model, tmp_path / "sparse")
    dense_bytes = (dense_path / "model.safetensors").stat().st_size
    sparse_bytes = (sparse_path / "model.safetensors").stat().st_size
    sizes = [weight_out_in(m).numel() for b in blocks(model) for _, m in block_linears(model, b)]
    linear_bytes = 4 * sum(n for n in sizes if n >= compression.MIN_ELEMENTS)
    # 2:4 fp32 linears take (0.5·4 + 1/8) / 4 = 53% of their dense bytes (tiny ones stay dense)
    assert sparse_bytes < dense_bytes - 0.45 * linear_bytes
    loaded = slmkit.load_model(sparse_path)
    tokens = random_tokens(2, 12, seed=5)
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    assert loaded.slmkit.steps == model.slmkit.steps
    assert linear_sparsity(loaded)["total"] == pytest.approx(0.5, abs=0.01)


def test_to_semi_structured_needs_cuda():
    model = tiny_model("llama")
    with pytest.raises(SlmkitError, match="CUDA"):
        to_semi_structured(model)


@pytest.mark.gpu
def test_to_semi_structured_on_gpu_matches_dense():
    from transformers import LlamaConfig, AutoModelForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).cuda().eval()
    prune(model, MagnitudePruneConfig(n_m="2:4"))
    tokens = random_tokens(2, 64, vocab_size=512).cuda()
    with torch.no_grad():
        dense = model(tokens).logits.float()
        result = to_semi_structured(model)
        sparse = model(tokens).logits.float()
    assert sum(v == "2:4 sparse" for v in result.values()) == len(result), result
    assert torch.allclose(sparse, dense, atol=5e-2, rtol=5e-2)
