import pytest
import torch

from slmkit.errors import SlmkitError
from slmkit.models import arch
from tests.conftest import FAMILIES, tiny_config, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_resolves(family):
    model = tiny_model(family)
    spec = arch.get_spec(model)
    assert spec.family == family
    layers = arch.blocks(model)
    assert len(layers) == 2
    names = [name for name, _ in arch.block_linears(model, layers[0])]
    assert names == spec.linear_names()
    for name, module in arch.block_linears(model, layers[0]):
        weight = arch.weight_out_in(module)
        assert weight.ndim == 2
    for path in (spec.embed, spec.final_norm, spec.lm_head):
        arch.get_module(model, path)


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_groups_have_matching_shapes(family):
    model = tiny_model(family)
    block = arch.blocks(model)[0]
    groups = {g.name: g for g in arch.fold_groups(model, block)}
    ungated = family in ("gpt2", "arcee", "apertus")  # act(up(x)): no scale passes the activation to down
    expected = {"attn_norm->qkv", "mlp_norm->gate_up", "v->o"} | (set() if ungated else {"up->down"})
    if family in ("olmo2", "olmo3", "exaone4"):  # no norm before attention or MLP: nothing folds into q/k/v or gate/up
        expected -= {"attn_norm->qkv", "mlp_norm->gate_up"}
    assert set(groups) == expected
    shape = arch.attention_shape(model.config)
    v_o = groups["v->o"]
    rows = arch.weight_out_in(v_o.source)[v_o.source_rows or slice(None)].shape[0]
    assert rows == shape.kv_rows
    assert arch.weight_out_in(v_o.targets[0]).shape[1] == rows * v_o.kv_group
    for name in {"attn_norm->qkv", "mlp_norm->gate_up"} & set(groups):
        group = groups[name]
        width = group.source.weight.shape[0]
        assert all(arch.weight_out_in(t).shape[1] == width for t in group.targets)


def test_weight_view_edits_module_in_place():
    model = tiny_model("gpt2")
    module = arch.get_module(arch.blocks(model)[0], "attn.c_attn")  # Conv1D, weight stored (in, out)
    view = arch.weight_out_in(module)
    assert view.shape == (module.weight.shape[1], module.weight.shape[0])
    view[0].zero_()
    assert torch.all(module.weight[:, 0] == 0)


def test_unsupported_architecture_lists_supported():
    import transformers

    config = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, word_embed_proj_dim=16)
    with pytest.raises(SlmkitError, match=r"architecture 'opt' is not supported; supported: .*gpt2.*llama"):
        arch.get_spec(config)


def test_supported_list_covers_the_families():
    assert {tiny_config(family).model_type for family in FAMILIES} <= set(arch.supported_model_types())
    assert tiny_config("llama").model_type == "llama"


def test_rotary_key_per_block():
    # Llama: the one rotary module; GPT-2: learned positions; Gemma-3: the block's layer type picks the
    # base (10k sliding, 1M full); SmolLM3: blocks whose no_rope_layers entry is 0 rotate nothing; EXAONE-4:
    # with a sliding window the full block rotates nothing, without one every block rotates
    expected = {"llama": ["", ""], "gpt2": [None, None], "gemma3": ["sliding_attention", "full_attention"],
                "smollm3": ["", None], "exaone4": ["", None]}
    for family, keys in expected.items():
        config = tiny_config(family)
        assert [arch.rotary_key(config, arch.get_spec(config), i) for i in range(2)] == keys, family
    config = tiny_config("exaone4", sliding_window=None, layer_types=["full_attention"] * 2)
    assert [arch.rotary_key(config, arch.get_spec(config), i) for i in range(2)] == ["", ""]


def test_context_length_and_check_context():
    from transformers import GPT2Config, LlamaConfig

    from slmkit.models.arch import check_context, context_length

    assert context_length(GPT2Config(n_positions=300)) == 300  # GPT-2 names it n_positions
    assert context_length(LlamaConfig(max_position_embeddings=4096)) == 4096
    model = tiny_model("llama")  # max_position_embeddings 256
    check_context(model, 256, "a block")  # exactly the limit is fine
    with pytest.raises(SlmkitError, match=r"^a block is 257 tokens, above the model's maximum of 256"):
        check_context(model, 257, "a block")


def test_config_summary_names_a_scaled_rotary():
    from tests.engine.test_engine import LONGROPE

    summary = arch.config_summary(tiny_config("phi3", **LONGROPE))
    assert summary["rotary"] == ("longrope: short factors up to 32 tokens, long ones for longer sequences; "
                                 "on 8 of 16 dims per head")  # Phi-3's partial rotary
    llama3 = tiny_config("llama", rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192})
    assert arch.config_summary(llama3)["rotary"] == "llama3"
    assert "rotary" not in arch.config_summary(tiny_config("llama"))  # plain RoPE says nothing
    gemma3 = tiny_config("gemma3", rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    assert arch.config_summary(gemma3)["rotary"] == "linear (full_attention layers)"
    hunyuan = tiny_config("hunyuan", rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0,
                                                      "rope_theta": 10000.0})
    assert arch.config_summary(hunyuan)["rotary"] == "NTK alpha 1000 (fixed, not dynamic)"
    # the layout: partial rotary (GLM: half of each head) and interleaved pairs, beside any scaling
    assert arch.config_summary(tiny_config("glm"))["rotary"] == "RoPE on 8 of 16 dims per head, over interleaved pairs"
    assert arch.config_summary(tiny_config("ernie4_5"))["rotary"] == "RoPE over interleaved pairs"


def test_granite_multipliers_are_read_from_the_config_and_summarized():
    config = tiny_config("granite")
    assert arch.multipliers(config) == arch.Multipliers(embedding=12.0, residual=0.22, logits_divisor=8.0)
    assert arch.multipliers(tiny_config("llama")) == arch.Multipliers()  # other families: all 1
    summary = arch.config_summary(config)
    assert summary["multipliers"] == "embeddings × 12, attention and MLP outputs × 0.22, logits ÷ 8"
    assert "multipliers" not in arch.config_summary(tiny_config("llama"))


@pytest.mark.parametrize("option", ["use_parallel_residual", "qk_layernorm"])
def test_a_config_switch_the_family_entry_does_not_describe_is_refused(option):
    config = tiny_config("stablelm", **{option: True})  # StableLM-2-12B's layout
    with pytest.raises(SlmkitError, match=f"stablelm with {option}=True .* is not supported"):
        arch.get_spec(config)
    assert "is not supported" in arch.config_summary(config)["architecture"]
    assert arch.get_spec(tiny_config("stablelm")).family == "stablelm"


@pytest.mark.parametrize("family", ["olmo2", "olmo3", "exaone4"])
def test_output_only_norms_are_summarized(family):
    summary = arch.config_summary(tiny_config(family))
    assert summary["norms"].startswith("on the attention and MLP outputs only")
    assert "norms" not in arch.config_summary(tiny_config("gemma2"))  # pre- and post-norms
