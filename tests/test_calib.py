import pytest
import torch

from slmkit import calib as calibration
from slmkit.errors import SlmkitError
from slmkit.models import arch
from tests.conftest import random_tokens, tiny_model


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_walk_reproduces_the_model_hidden_states(family):
    model = tiny_model(family)
    tokens = random_tokens(5, 12)  # 5 sequences in batches of 2: a ragged last batch
    with torch.no_grad():
        expected = model(tokens, output_hidden_states=True).hidden_states  # embeddings, block 0 out, ...
    seen = []
    for layer in calibration.layerwise(model, tokens, batch_size=2):
        seen.append(layer.index)
        got = torch.cat(layer.hidden_states)
        if layer.index == 0:
            torch.testing.assert_close(got, expected[0])
    assert seen == [0, 1]
    # after the walk the last hidden states were propagated through block 1 (before the final norm)
    final = torch.cat(layer.hidden_states)
    norm = arch.get_module(model, arch.get_spec(model).final_norm)
    with torch.no_grad():
        torch.testing.assert_close(norm(final), expected[-1], rtol=1e-5, atol=1e-5)


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
