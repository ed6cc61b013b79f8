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


# --- resuming an interrupted walk -----------------------------------------------------------------------

def _walk_configs():
    from slmkit.prune import SparseGPTConfig, WandaConfig
    from slmkit.quantize import AWQConfig, GPTQConfig, SmoothQuantConfig

    return [GPTQConfig(group_size=16, act_order=True), AWQConfig(group_size=32),
            SmoothQuantConfig(alpha_grid=[0.3, 0.6], float_budget=0.2, sensitivity_blocks=2),
            WandaConfig(sparsity=0.5), SparseGPTConfig(n_m="2:4")]


def _apply(model, config, calib, checkpoint_dir=None):
    import slmkit

    return getattr(slmkit, config.category)(model, config, calib=calib, checkpoint_dir=checkpoint_dir)


def _interrupt_at_block(monkeypatch, index):
    """Make the walk's statistics pass raise KeyboardInterrupt in block ``index`` (a crash mid-block)."""
    original = calibration.observe_inputs

    def observe(layer, modules, reduce):
        if layer.index == index:
            raise KeyboardInterrupt
        return original(layer, modules, reduce)

    monkeypatch.setattr(calibration, "observe_inputs", observe)


def _record_json(model):
    import json

    from slmkit.models.checkpoint import json_default

    record = model.slmkit
    return json.dumps({"modules": record.modules, "metrics": record.metrics}, sort_keys=True, default=json_default)


@pytest.mark.parametrize("config", _walk_configs(), ids=lambda c: c.name)
def test_an_interrupted_walk_resumes_after_its_last_finished_block_with_the_same_result(config, tmp_path,
                                                                                        monkeypatch):
    import copy

    from slmkit.quantize import smoothquant as smoothquant_module

    calib = random_tokens(6, 32, seed=3)
    original = tiny_model("llama", num_hidden_layers=4)
    straight = _apply(copy.deepcopy(original), config, calib)

    _interrupt_at_block(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _apply(copy.deepcopy(original), config, calib, tmp_path / "walk")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "walk").glob("block-*")) == ["block-0000.safetensors",
                                                                           "block-0001.safetensors"]
    sensitivity_calls = []
    measure = smoothquant_module.layer_sensitivity
    monkeypatch.setattr(smoothquant_module, "layer_sensitivity",
                        lambda *args: sensitivity_calls.append(1) or measure(*args))
    walked = []
    observe = calibration.observe_inputs
    monkeypatch.setattr(calibration, "observe_inputs",
                        lambda layer, modules, reduce: walked.append(layer.index) or observe(layer, modules, reduce))
    resumed = _apply(copy.deepcopy(original), config, calib, tmp_path / "walk")

    assert sorted(set(walked)) == [2, 3]  # blocks 0 and 1 came from the directory, not recomputed
    assert sensitivity_calls == []  # SmoothQuant's sensitivity pass is kept too
    expected = straight.state_dict()
    assert resumed.state_dict().keys() == expected.keys()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert _record_json(resumed) == _record_json(straight)


def test_a_walk_directory_of_other_work_or_a_damaged_block_is_refused(tmp_path, monkeypatch):
    import copy

    from slmkit.quantize import GPTQConfig

    calib = random_tokens(6, 32, seed=3)
    original = tiny_model("llama", num_hidden_layers=4)
    _interrupt_at_block(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _apply(copy.deepcopy(original), GPTQConfig(group_size=16), calib, tmp_path / "walk")
    monkeypatch.undo()
    for config, tokens in [(GPTQConfig(group_size=32), calib), (GPTQConfig(group_size=16), calib[:5])]:
        with pytest.raises(SlmkitError, match="holds the blocks of another calibration walk"):
            _apply(copy.deepcopy(original), config, tokens, tmp_path / "walk")
    block = tmp_path / "walk" / "block-0001.safetensors"
    block.write_bytes(block.read_bytes()[:100])
    with pytest.raises(SlmkitError, match="block-0001.safetensors: cannot read a saved block"):
        _apply(copy.deepcopy(original), GPTQConfig(group_size=16), calib, tmp_path / "walk")


def test_a_cached_pass_is_computed_once_and_refused_to_other_work(tmp_path):
    checkpoint = calibration.WalkCheckpoint(tmp_path / "walk", "fingerprint a")
    calls = []
    assert calibration.cached(checkpoint, "stat", lambda: calls.append(1) or {"x": 1.5}) == {"x": 1.5}
    assert calibration.cached(checkpoint, "stat", lambda: calls.append(1) or {"x": 2.0}) == {"x": 1.5}
    assert calls == [1]
    with pytest.raises(SlmkitError, match="holds the blocks of another calibration walk"):
        calibration.cached(calibration.WalkCheckpoint(tmp_path / "walk", "fingerprint b"), "stat", lambda: 0)
    assert calibration.cached(None, "stat", lambda: 3) == 3
