import pytest
import torch

from slmkit import calib as calibration
from slmkit.errors import SlmkitError
from slmkit.models import arch
from tests.conftest import FAMILIES, random_tokens, tiny_config, tiny_model


def _walk_matches_model(model, tokens, batch_size):
    """Every block's captured inputs equal the model's own hidden states, and so does the walk's output."""
    with torch.no_grad():
        expected = model(tokens, output_hidden_states=True).hidden_states  # embeddings, block 0 out, ...
    seen = []
    for layer in calibration.layerwise(model, tokens, batch_size=batch_size):
        seen.append(layer.index)
        torch.testing.assert_close(torch.cat(layer.hidden_states), expected[layer.index], rtol=1e-5, atol=1e-5)
    assert seen == list(range(len(arch.blocks(model))))
    # after the walk the last hidden states were propagated through the last block (before the final norm)
    final = torch.cat(layer.hidden_states)
    norm = arch.get_module(model, arch.get_spec(model).final_norm)
    with torch.no_grad():
        torch.testing.assert_close(norm(final), expected[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_walk_reproduces_the_model_hidden_states(family):
    # 5 sequences in batches of 2: a ragged last batch
    _walk_matches_model(tiny_model(family), random_tokens(5, 12), batch_size=2)


@pytest.mark.parametrize("family, overrides", [
    ("gemma2", dict(sliding_window=4)),  # layers alternate sliding (even) and full (odd) attention
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),  # block 1 slides
])
def test_walk_passes_each_block_its_own_mask(family, overrides):
    # sequences longer than the window: a sliding layer's mask differs from a full one's, so a block
    # calibrated with another block's mask would not reproduce the model
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert len(set(config.layer_types)) == 2, config.layer_types
    _walk_matches_model(model, random_tokens(3, 16), batch_size=2)


def test_input_abs_max_matches_direct_computation():
    model = tiny_model("llama")
    tokens = random_tokens(3, 10)
    layer = next(calibration.layerwise(model, tokens, batch_size=3))
    q_proj = layer.block.self_attn.q_proj
    stats = calibration.input_abs_max(layer, {"q": q_proj})
    normed = layer.block.input_layernorm(torch.cat(layer.hidden_states))
    torch.testing.assert_close(stats["q"], normed.abs().amax(dim=(0, 1)))


def test_bad_tokens_are_refused():
    with pytest.raises(SlmkitError, match="non-empty"):
        next(calibration.layerwise(tiny_model("llama"), torch.zeros(0, dtype=torch.long)))
