import pytest
import torch

from slmkit import calib as calibration
from slmkit.errors import SlmkitError
from slmkit.models import arch
from tests.conftest import FAMILIES, assert_ordinary_modes, random_tokens, tiny_config, tiny_model


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


def test_shrink_gram_keeps_the_diagonal_and_damps_the_rest():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    gram, _ = calibration.gram_reduce(x, None)
    before = gram.clone()
    assert calibration.shrink_gram(gram, 0.0) is gram
    shrunk = calibration.shrink_gram(gram, 0.25)
    torch.testing.assert_close(shrunk.diagonal(), gram.diagonal())
    off = ~torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(shrunk[off], 0.75 * gram[off])
    assert torch.equal(calibration.shrink_gram(gram, 1.0), torch.diag(gram.diagonal()))
    assert torch.equal(gram, before)  # a new tensor; the input is untouched


def test_bad_tokens_are_refused():
    with pytest.raises(SlmkitError, match="non-empty"):
        next(calibration.layerwise(tiny_model("llama"), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(SlmkitError, match="a calibration block is 300 tokens, above the model's maximum of 256"):
        next(calibration.layerwise(tiny_model("llama"), torch.zeros(2, 300, dtype=torch.long)))


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


def _save_frontier(monkeypatch, every_block: bool):
    """Make the walks keep their hidden states after every block, or never (the real rule is timed)."""
    monkeypatch.setattr(calibration.WalkCheckpoint, "_frontier_due", lambda self: every_block)


def _count_block_runs(model):
    """{block index: forward calls} of ``model``'s blocks from now on."""
    calls = {index: 0 for index in range(len(arch.blocks(model)))}
    for index, block in enumerate(arch.blocks(model)):
        block.register_forward_pre_hook(lambda module, args, index=index: calls.__setitem__(index, calls[index] + 1))
    return calls


def _record_json(model):
    import json

    from slmkit.models.checkpoint import json_default

    record = model.slmkit
    return json.dumps({"modules": record.modules, "metrics": record.metrics}, sort_keys=True, default=json_default)


def _assert_same_model(resumed, straight):
    """Bit-identical tensors, the same slmkit record (module layouts, metrics) and the same config."""
    expected = straight.state_dict()
    assert resumed.state_dict().keys() == expected.keys()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert _record_json(resumed) == _record_json(straight)
    assert resumed.config.to_dict() == straight.config.to_dict()


@pytest.mark.parametrize("frontier", [True, False], ids=["frontier", "blocks-only"])
@pytest.mark.parametrize("config", _walk_configs(), ids=lambda c: c.name)
def test_an_interrupted_walk_resumes_after_its_last_finished_block_with_the_same_result(config, frontier, tmp_path,
                                                                                        monkeypatch):
    import copy

    from slmkit.quantize import smoothquant as smoothquant_module

    calib = random_tokens(6, 32, seed=3)  # one batch of 6 per block run
    original = tiny_model("llama", num_hidden_layers=4)
    straight = _apply(copy.deepcopy(original), config, calib)

    _interrupt_at_block(monkeypatch, 2)
    _save_frontier(monkeypatch, frontier)
    with pytest.raises(KeyboardInterrupt):
        _apply(copy.deepcopy(original), config, calib, tmp_path / "walk")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "walk").glob("block-*")) == ["block-0000.safetensors",
                                                                           "block-0001.safetensors"]
    assert (tmp_path / "walk" / "frontier.safetensors").is_file() == frontier
    sensitivity_calls = []
    measure = smoothquant_module.layer_sensitivity
    monkeypatch.setattr(smoothquant_module, "layer_sensitivity",
                        lambda *args: sensitivity_calls.append(1) or measure(*args))
    walked = []
    observe = calibration.observe_inputs
    monkeypatch.setattr(calibration, "observe_inputs",
                        lambda layer, modules, reduce: walked.append(layer.index) or observe(layer, modules, reduce))
    resumed = copy.deepcopy(original)
    runs = _count_block_runs(resumed)
    _apply(resumed, config, calib, tmp_path / "walk")

    assert sorted(set(walked)) == [2, 3]  # blocks 0 and 1 came from the directory, not recomputed
    # with the hidden states after block 1 kept, blocks 0 and 1 do not even run to rebuild block 2's inputs
    assert (runs[0], runs[1]) == ((0, 0) if frontier else (1, 1))
    assert sensitivity_calls == []  # SmoothQuant's sensitivity pass is kept too
    _assert_same_model(resumed, straight)


def test_a_walk_directory_of_other_work_or_a_damaged_block_is_refused(tmp_path, monkeypatch):
    import copy

    from slmkit.quantize import GPTQConfig

    calib = random_tokens(6, 32, seed=3)
    original = tiny_model("llama", num_hidden_layers=4)
    _interrupt_at_block(monkeypatch, 2)
    _save_frontier(monkeypatch, True)
    with pytest.raises(KeyboardInterrupt):
        _apply(copy.deepcopy(original), GPTQConfig(group_size=16), calib, tmp_path / "walk")
    monkeypatch.undo()
    for config, tokens in [(GPTQConfig(group_size=32), calib), (GPTQConfig(group_size=16), calib[:5])]:
        with pytest.raises(SlmkitError, match="holds the blocks of another calibration walk"):
            _apply(copy.deepcopy(original), config, tokens, tmp_path / "walk")
    frontier = tmp_path / "walk" / "frontier.safetensors"
    frontier.write_bytes(frontier.read_bytes()[:100])
    with pytest.raises(SlmkitError, match="frontier.safetensors: cannot read the saved hidden states"):
        _apply(copy.deepcopy(original), GPTQConfig(group_size=16), calib, tmp_path / "walk")
    frontier.unlink()
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


# --- walks that only measure: one run per block, and resume from their saved statistics ------------------

def test_a_body_that_hands_over_the_outputs_runs_each_block_once_with_the_same_walk():
    model = tiny_model("llama", num_hidden_layers=3)
    tokens = random_tokens(5, 12)
    calls = {index: 0 for index in range(3)}
    hooks = [block.register_forward_pre_hook(lambda module, args, index=index: calls.__setitem__(index, calls[index] + 1))
             for index, block in enumerate(arch.blocks(model))]
    batches = 3  # 5 sequences in batches of 2
    plain, handed = [], []
    for layer in calibration.layerwise(model, tokens, batch_size=2):
        calibration.input_abs_max(layer, {"down": layer.block.mlp.down_proj})
        plain.append(torch.cat(layer.hidden_states))
    assert calls == {index: 2 * batches for index in range(3)}  # the statistics run, then the walk's
    calls.update({index: 0 for index in range(3)})
    for layer in calibration.layerwise(model, tokens, batch_size=2):
        calibration.observe_inputs(layer, {"down": layer.block.mlp.down_proj}, calibration.abs_max_reduce,
                                   keep_outputs=True)
        handed.append(torch.cat(layer.hidden_states))
    assert calls == {index: batches for index in range(3)}
    final = torch.cat(layer.hidden_states)
    for a, b in zip(plain, handed):
        assert torch.equal(a, b)
    _walk_matches_model(model, tokens, batch_size=2)  # the hooks counted, nothing changed
    for hook in hooks:
        hook.remove()
    assert final.shape == (5, 12, model.config.hidden_size)


def _stats_configs():
    from slmkit.prune import DepthPruneConfig, WidthPruneConfig
    from slmkit.transforms import LayerwiseScalingConfig, SharedFFNConfig

    return [WidthPruneConfig(ffn=0.5, heads=0.5, importance="activation"),
            WidthPruneConfig(param_budget=0.7, per_layer=True),
            DepthPruneConfig(num_blocks=2), DepthPruneConfig(num_blocks=1, importance="loss", loss_sequences=4),
            LayerwiseScalingConfig(alpha_min=0.5, alpha_max=1.0, beta_min=0.5, beta_max=1.5, multiple_of=16),
            SharedFFNConfig(group_size=2, init="merge", merge_steps=4, rank=2, sample_tokens=64)]


def _interrupt_on_call(module, call):
    """Raise KeyboardInterrupt when ``module`` is called for the ``call``-th time (a crash mid-run)."""
    seen = [0]

    def hook(module, args):
        seen[0] += 1
        if seen[0] == call:
            raise KeyboardInterrupt

    return module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("config", _stats_configs(), ids=["width", "width-budget-per-layer", "depth-influence",
                                                          "depth-loss", "layerwise-scaling", "shared-ffn"])
def test_an_interrupted_measuring_step_resumes_with_the_same_result(config, tmp_path, monkeypatch):
    """Importance walks resume after their last measured block (from the hidden states saved after it: no
    block runs twice), depth by loss after its last skipped block, a shared FFN after its last merged group
    (from the hidden states saved after that group)."""
    import copy

    from slmkit.transforms import shared_ffn

    calib = random_tokens(6, 32, seed=3)  # batch_size 8: one batch per forward
    original = tiny_model("llama", num_hidden_layers=4)
    straight = _apply(copy.deepcopy(original), config, calib)
    interrupted = copy.deepcopy(original)
    merges = []
    if config.name == "shared_ffn":  # interrupt the second group's merge: the first is kept
        merge = shared_ffn.merge
        monkeypatch.setattr(shared_ffn, "merge", lambda *args, desc, **kwargs: merges.append(desc) or (
            (_ for _ in ()).throw(KeyboardInterrupt) if desc.endswith("group 1") else merge(*args, desc=desc, **kwargs)))
    elif getattr(config, "importance", "") == "loss":  # base loss, block 0 skipped, then stop in block 1's
        _interrupt_on_call(arch.blocks(interrupted)[0], 3)
    else:  # stop in block 2's measurement
        _interrupt_on_call(arch.blocks(interrupted)[2], 1)
    _save_frontier(monkeypatch, True)
    with pytest.raises(KeyboardInterrupt):
        _apply(interrupted, config, calib, tmp_path / "work")
    monkeypatch.undo()

    measured = []
    save_stats = calibration.StatsCheckpoint.save_stats
    monkeypatch.setattr(calibration.StatsCheckpoint, "save_stats",
                        lambda self, index, stats: measured.append(index) or save_stats(self, index, stats))
    computed = []
    cached = calibration.cached
    monkeypatch.setattr(calibration, "cached", lambda ckpt, name, fn: cached(ckpt, name, lambda: computed.append(name) or fn()))
    if config.name == "shared_ffn":
        merge = shared_ffn.merge
        monkeypatch.setattr(shared_ffn, "merge", lambda *args, desc, **kwargs: merges.append(desc) or merge(
            *args, desc=desc, **kwargs))
    resumed = copy.deepcopy(original)
    runs = _count_block_runs(resumed)
    _apply(resumed, config, calib, tmp_path / "work")

    if config.name == "shared_ffn":  # group 0 (blocks 0, 1) is loaded; group 1's inputs are sampled again
        assert merges == ["merging FFN group 0", "merging FFN group 1", "merging FFN group 1"]
    if getattr(config, "importance", "") == "loss":
        assert computed == ["loss-skip-0001", "loss-skip-0002", "loss-skip-0003"]
    else:
        assert measured == [2, 3]  # blocks 0 and 1: their statistics came from the directory
        assert runs == {0: 0, 1: 0, 2: 1, 3: 1}  # and block 2's inputs from the saved hidden states
    _assert_same_model(resumed, straight)


def test_a_shared_ffn_interrupted_inside_a_group_samples_that_whole_group_again(tmp_path, monkeypatch):
    """A group's FFN inputs live in memory only: stopped in block 3 (group 1's second block), the resumed
    run starts at block 2 from the hidden states saved after group 0, whose shared FFN it loads."""
    import copy

    from slmkit.transforms import SharedFFNConfig, shared_ffn

    config = SharedFFNConfig(group_size=2, init="merge", merge_steps=4, rank=2, sample_tokens=64)
    calib = random_tokens(6, 32, seed=3)
    original = tiny_model("llama", num_hidden_layers=4)
    straight = _apply(copy.deepcopy(original), config, calib)
    merges = []
    merge = shared_ffn.merge
    monkeypatch.setattr(shared_ffn, "merge", lambda *args, desc, **kwargs: merges.append(desc) or merge(
        *args, desc=desc, **kwargs))
    interrupted = copy.deepcopy(original)
    _interrupt_on_call(arch.blocks(interrupted)[3], 1)
    with pytest.raises(KeyboardInterrupt):
        _apply(interrupted, config, calib, tmp_path / "work")
    assert merges == ["merging FFN group 0"]

    resumed = copy.deepcopy(original)
    runs = _count_block_runs(resumed)
    _apply(resumed, config, calib, tmp_path / "work")
    assert merges == ["merging FFN group 0", "merging FFN group 1"]
    assert runs == {0: 0, 1: 0, 2: 1, 3: 1}
    _assert_same_model(resumed, straight)


def test_a_shared_ffn_resume_without_a_finished_groups_weights_is_refused(tmp_path, monkeypatch):
    import copy

    from slmkit.transforms import SharedFFNConfig

    config = SharedFFNConfig(group_size=2, init="average")
    original = tiny_model("llama", num_hidden_layers=4)
    interrupted = copy.deepcopy(original)
    _interrupt_on_call(arch.blocks(interrupted)[3], 1)
    with pytest.raises(KeyboardInterrupt):
        _apply(interrupted, config, random_tokens(6, 32, seed=3), tmp_path / "work")
    (tmp_path / "work" / "ffn-group-0000.safetensors").unlink()
    with pytest.raises(SlmkitError, match="a finished group's shared FFN is missing; delete the directory"):
        _apply(copy.deepcopy(original), config, random_tokens(6, 32, seed=3), tmp_path / "work")


@pytest.mark.parametrize("config_name", ["width", "layerwise_scaling"])
def test_an_interrupted_taylor_importance_resumes_after_its_last_finished_batch(config_name, tmp_path, monkeypatch):
    import copy

    from slmkit.prune import WidthPruneConfig
    from slmkit.transforms import LayerwiseScalingConfig

    config = (WidthPruneConfig(ffn=0.5, heads=0.5, importance="taylor", batch_size=2) if config_name == "width" else
              LayerwiseScalingConfig(alpha_min=0.5, alpha_max=1.0, beta_min=0.5, beta_max=1.5, multiple_of=16,
                                     importance="taylor", batch_size=2))
    calib = random_tokens(6, 32, seed=3)  # three batches
    original = tiny_model("llama", num_hidden_layers=4)
    straight = _apply(copy.deepcopy(original), config, calib)
    interrupted = copy.deepcopy(original)
    _interrupt_on_call(arch.blocks(interrupted)[0], 5)  # in the third batch (one pass per sequence)
    with pytest.raises(KeyboardInterrupt):
        _apply(interrupted, config, calib, tmp_path / "work")
    assert all(p.grad is None for p in interrupted.parameters())
    kept = sorted(p.name for p in (tmp_path / "work").glob("taylor-batch-*"))
    assert kept == ["taylor-batch-00000.safetensors", "taylor-batch-00001.safetensors"]
    assert_ordinary_modes(tmp_path / "work")

    resumed = copy.deepcopy(original)
    runs = _count_block_runs(resumed)
    _apply(resumed, config, calib, tmp_path / "work")
    assert runs[0] == 2  # the third batch's two sequences only
    _assert_same_model(resumed, straight)


def test_saved_statistics_of_other_work_or_damaged_ones_are_refused(tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    tokens = random_tokens(4, 16)

    def measure(layer):
        return calibration.observe_inputs(layer, {"down": layer.block.mlp.down_proj}, calibration.sq_sum_reduce,
                                          keep_outputs=True)

    checkpoint = calibration.WalkCheckpoint(tmp_path / "walk", "fingerprint a").stats("importance")
    first = calibration.block_stats(model, tokens, measure, checkpoint=checkpoint)
    assert sorted(p.name for p in checkpoint.directory.glob("stats-*")) == [f"stats-{i:04d}.safetensors" for i in range(3)]
    assert_ordinary_modes(checkpoint.directory)
    again = calibration.block_stats(model, tokens, lambda layer: pytest.fail("measured again"), checkpoint=checkpoint)
    for a, b in zip(first, again):
        assert torch.equal(a["down"], b["down"])
    with pytest.raises(SlmkitError, match="holds the blocks of another calibration walk"):
        calibration.block_stats(model, tokens, measure,
                                checkpoint=calibration.StatsCheckpoint(checkpoint.directory, "fingerprint b"))
    damaged = checkpoint.directory / "stats-0001.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:50])
    with pytest.raises(SlmkitError, match="stats-0001.safetensors: cannot read saved statistics"):
        calibration.block_stats(model, tokens, measure, checkpoint=checkpoint)


def test_cached_tensors_are_computed_once_and_refused_to_other_work(tmp_path):
    checkpoint = calibration.WalkCheckpoint(tmp_path / "walk", "fingerprint a")
    calls = []

    def compute():
        calls.append(1)
        return {"w": torch.arange(6.0).view(2, 3)}, {"error": 0.25}

    tensors, info = calibration.cached_tensors(checkpoint, "group-0", compute)
    again, info_again = calibration.cached_tensors(checkpoint, "group-0", compute)
    assert calls == [1] and info_again == info == {"error": 0.25}
    assert torch.equal(again["w"], tensors["w"])
    with pytest.raises(SlmkitError, match="holds the blocks of another calibration walk"):
        calibration.cached_tensors(calibration.WalkCheckpoint(tmp_path / "walk", "fingerprint b"), "group-0", compute)
    file = checkpoint.directory / "group-0.safetensors"
    file.write_bytes(file.read_bytes()[:40])
    with pytest.raises(SlmkitError, match="group-0.safetensors: cannot read a kept result"):
        calibration.cached_tensors(checkpoint, "group-0", compute)
    assert calibration.cached_tensors(None, "group-0", compute)[1] == {"error": 0.25} and calls == [1, 1]


def test_hidden_states_that_do_not_fit_the_walk_are_refused(tmp_path):
    hidden = [torch.zeros(2, 8, 64), torch.zeros(1, 8, 64)]
    checkpoint = calibration.WalkCheckpoint(tmp_path / "walk", "fingerprint a")
    checkpoint.save_frontier(2, hidden)
    start, loaded = checkpoint.load_frontier(3, hidden)
    assert start == 2 and all(torch.equal(a, b) for a, b in zip(loaded, hidden))
    for done, like in [(1, hidden), (3, hidden[:1]), (3, [hidden[0].double(), hidden[1]])]:
        with pytest.raises(SlmkitError, match="saved hidden states do not fit this walk"):
            checkpoint.load_frontier(done, like)
    with pytest.raises(SlmkitError, match="holds the blocks of another calibration walk"):
        calibration.WalkCheckpoint(tmp_path / "walk", "fingerprint b").load_frontier(3, hidden)
    assert calibration.WalkCheckpoint(tmp_path / "other", "fingerprint a").load_frontier(3, hidden) == (0, hidden)


def test_the_hidden_states_are_saved_after_the_first_block_then_every_ten_write_times(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(calibration.time, "perf_counter", lambda: clock[0])
    checkpoint = calibration.WalkCheckpoint(tmp_path / "walk", "fingerprint a")
    writes = []
    save = calibration.save_tensors_atomic

    def timed_save(path, tensors, metadata):
        writes.append(int(metadata["next"]))
        clock[0] += 0.5  # each write takes 0.5 s
        save(path, tensors, metadata)

    monkeypatch.setattr(calibration, "save_tensors_atomic", timed_save)
    for next_index in range(1, 9):
        checkpoint.save_frontier(next_index, [torch.zeros(1, 2, 4)])
        clock[0] += 2.0  # each block takes 2 s
    assert writes == [1, 4, 7]  # 5 s (10 × 0.5 s) between writes: at most about a tenth of the time saving
