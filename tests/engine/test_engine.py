"""The engine against transformers' generate: same greedy tokens on every supported family and on
compressed models; chunked prefill, prefix caching and preemption change nothing but the speed."""

import dataclasses

import pytest
import numpy as np
import torch

import slmkit
from slmkit.config import ConfigError
from slmkit.engine import Engine, EngineConfig, SamplingParams
from slmkit.errors import SlmkitError
from slmkit.models.arch import blocks
from slmkit.prune import WidthPruneConfig, prune
from tests.conftest import FAMILIES, random_tokens, tiny_config, tiny_model

ENGINE_FAMILIES = FAMILIES
SMALL = EngineConfig(num_blocks=96, block_size=8, max_num_batched_tokens=48, max_batch_size=8)


def peaked(family: str, seed: int = 0, **config):
    """A tiny model with larger weights, so greedy choices are not near-ties of random logits;
    ``config``: fields of its config to change (e.g. ``sliding_window``)."""
    if config:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(family, **config), dtype=torch.float32).eval()
    else:
        model = tiny_model(family, seed)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3.0)
    return model


def prompts(*lengths: int) -> list[list[int]]:
    return [random_tokens(1, n, seed=n)[0].tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    output = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=0, temperature=None, top_p=None, top_k=None)
    return output[0, len(prompt):].tolist()


def assert_same_as_hf(model, engine, batch, max_tokens=64, **params):
    outs = engine.generate(batch, SamplingParams(max_tokens=max_tokens, **params), progress=False)
    for prompt, out in zip(batch, outs):
        assert out.token_ids == hf_greedy(model, prompt, max_tokens), f"prompt of {len(prompt)} tokens differs"
    return outs


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_greedy_equals_hf_generate_for_64_tokens(family):
    model = peaked(family)
    engine = Engine(model, SMALL)
    outs = assert_same_as_hf(model, engine, prompts(5, 23, 40))
    assert sum(len(o.token_ids) for o in outs) > 100  # not all stopped at once on an EOS
    assert engine.allocator.available == engine.allocator.usable  # every block released


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
@pytest.mark.parametrize("use_kernels", [False, True])
def test_prefill_logits_equal_the_model_forward(family, use_kernels):
    # logits, not just greedy tokens: a wrong constant scale (an embedding scaled twice) can keep the argmax
    model = tiny_model(family)
    engine = Engine(model, SMALL, use_kernels=use_kernels)
    prompt = prompts(13)[0]
    engine.add_request(prompt, SamplingParams(max_tokens=1))
    batch = engine._chunk_batch(engine._prompt_items(engine.scheduler.schedule().prefill))
    batch.logits_rows = None
    with torch.no_grad():
        torch.testing.assert_close(engine.runner.forward(batch), model(torch.tensor([prompt])).logits[0],
                                   atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("family, window", [
    ("gemma2", dict(sliding_window=8)),  # sliding and full layers alternate; soft-capped logits
    ("gemma3", dict(sliding_window=8)),  # a sliding block and a full one, each with its own rotary base
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),  # block 1 slides
])
@pytest.mark.parametrize("use_kernels", [False, True])
def test_sliding_window_layers_past_the_window_equal_hf(family, window, use_kernels):
    # prompts and outputs much longer than the window, prefilled in chunks after cached keys
    model = peaked(family, **window)
    assert len(set(model.config.layer_types)) == 2
    engine = Engine(model, dataclasses.replace(SMALL, max_num_batched_tokens=16), use_kernels=use_kernels)
    assert_same_as_hf(model, engine, prompts(5, 30), max_tokens=40 if use_kernels else 64)


def test_per_layer_widths_and_pruned_model():
    model = peaked("llama")
    prune(model, WidthPruneConfig(ffn=0.3, heads=0.5, per_layer=True, head_unit="group"),
          calib=random_tokens(4, 32, seed=7))
    assert type(model).__name__ == "SlmForCausalLM"
    engine = Engine(model, SMALL)
    assert [c.keys.shape[2] for c in engine.caches] == model.config.layer_num_kv_heads
    assert_same_as_hf(model, engine, prompts(7, 30))


def test_w8a8_model_runs_its_int8_linears():
    model = peaked("llama")
    slmkit.quantize(model, slmkit.SmoothQuantConfig(), calib=random_tokens(4, 32, seed=7))
    assert type(blocks(model)[0].self_attn.q_proj).__name__ == "W8A8Linear"
    assert_same_as_hf(model, Engine(model, SMALL), prompts(9, 33))


def test_fused_kernels_on_the_interpreter_match_the_pytorch_path():
    model = peaked("llama")
    batch = prompts(6, 19)
    plain = Engine(model, SMALL, use_kernels=False).generate(batch, SamplingParams(max_tokens=12), progress=False)
    fused_engine = Engine(model, SMALL, use_kernels=True, max_num_batched_tokens=8)  # chunks after cached keys
    fused = fused_engine.generate(batch, SamplingParams(max_tokens=12), progress=False)
    assert [o.token_ids for o in fused] == [o.token_ids for o in plain]


def test_chunked_prefill_and_small_batches_change_nothing():
    model = peaked("qwen2")
    engine = Engine(model, dataclasses.replace(SMALL, max_num_batched_tokens=5, max_batch_size=2))
    assert_same_as_hf(model, engine, prompts(3, 17, 29, 11), max_tokens=20)


def test_prefix_cache_reuses_a_shared_system_prompt():
    model = peaked("llama")
    system = random_tokens(1, 40, seed=99)[0].tolist()
    batch = [system + p for p in prompts(3, 6)]
    engine = Engine(model, SMALL)
    first = assert_same_as_hf(model, engine, batch[:1], max_tokens=16)
    assert first[0].cached_prompt_tokens == 0
    second = assert_same_as_hf(model, engine, batch[1:], max_tokens=16)
    assert second[0].cached_prompt_tokens == 40  # 5 full blocks of 8 tokens came from the cache
    repeat = assert_same_as_hf(model, engine, batch[:1], max_tokens=16)
    assert repeat[0].cached_prompt_tokens == 40  # the whole prompt but its last (partial) block
    off = Engine(model, SMALL, prefix_caching=False).generate(batch, SamplingParams(max_tokens=16), progress=False)
    assert [o.cached_prompt_tokens for o in off] == [0, 0]


def test_preemption_when_the_cache_runs_out_keeps_outputs_exact():
    model = peaked("mistral")
    batch = prompts(10, 12, 14, 9, 15, 11)
    engine = Engine(model, dataclasses.replace(SMALL, num_blocks=12, prefix_caching=False))  # 88 token slots
    assert_same_as_hf(model, engine, batch, max_tokens=30)
    assert engine.scheduler.preemptions > 0
    assert engine.allocator.available == engine.allocator.usable


def test_requests_that_cannot_fit_are_refused_clearly():
    model = peaked("llama")
    engine = Engine(model, dataclasses.replace(SMALL, num_blocks=5))  # 4 usable blocks = 32 tokens
    with pytest.raises(SlmkitError, match="KV-cache blocks"):
        engine.add_request(prompts(20)[0], SamplingParams(max_tokens=20))
    with pytest.raises(SlmkitError, match="max_model_len"):
        Engine(model, SMALL).add_request(prompts(200)[0], SamplingParams(max_tokens=100))  # 256 positions
    with pytest.raises(SlmkitError, match="token ids must be in"):
        engine.add_request([5, 300])
    with pytest.raises(SlmkitError, match=r"a list of integer token ids, got \[1.5, 2.0\]"):
        engine.add_request([1.5, 2.0])  # was truncated to [1, 2]
    assert engine.encode([5, torch.tensor(6), np.int64(7)]) == [5, 6, 7]
    assert not engine.has_unfinished()


def test_memory_fraction_sizes_the_cache():
    model = peaked("llama")
    engine = Engine(model, EngineConfig(block_size=8, max_batch_size=2, memory_fraction=0.5))
    assert engine.num_blocks == 2 * engine.max_blocks_per_seq + 1  # capped at what two full requests need
    assert engine.cache_bytes == engine.num_blocks * 2 * 2 * 8 * 2 * 16 * 4  # 2 layers, k+v, 8 tok, 2 heads, D 16


def test_repetition_penalty_matches_hf():
    model = peaked("llama")
    batch = prompts(12)
    out = Engine(model, SMALL).generate(batch, SamplingParams(max_tokens=24, repetition_penalty=1.5),
                                        progress=False)[0]
    expected = model.generate(torch.tensor(batch), max_new_tokens=24, do_sample=False, repetition_penalty=1.5,
                              pad_token_id=0)[0, 12:].tolist()
    assert out.token_ids == expected


def test_sampling_is_reproducible_per_request_whatever_the_batch():
    model = tiny_model("llama")
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=123, ignore_eos=True)
    alone = Engine(model, SMALL).generate(prompts(8), params, progress=False)[0].token_ids
    crowd = Engine(model, SMALL).generate(prompts(30, 8, 5), [dataclasses.replace(params, seed=s) for s in (1, 123, 2)],
                                          progress=False)
    assert crowd[1].token_ids == alone
    other = Engine(model, SMALL).generate(prompts(8), dataclasses.replace(params, seed=124), progress=False)[0]
    assert other.token_ids != alone
    greedy = Engine(model, SMALL).generate(prompts(8), SamplingParams(max_tokens=20, ignore_eos=True),
                                           progress=False)[0]
    top1 = Engine(model, SMALL).generate(prompts(8), dataclasses.replace(params, top_k=1), progress=False)[0]
    assert top1.token_ids == greedy.token_ids


def test_abort_and_early_stream_exit_free_blocks():
    model = peaked("llama")
    engine = Engine(model, SMALL)
    stream = engine.stream(prompts(20)[0], SamplingParams(max_tokens=40, ignore_eos=True))
    next(stream)
    stream.close()
    request = engine.add_request(prompts(9)[0])
    engine.step()
    engine.abort(request)
    assert not engine.has_unfinished() and engine.allocator.available == engine.allocator.usable


def test_unknown_engine_option_fails_naming_it():
    with pytest.raises(SlmkitError, match="unknown option 'max_batch'"):
        Engine(peaked("llama"), SMALL, max_batch=4)


def test_cli_generate_stream_prints_what_the_hf_path_prints(smollm2_path, capsys):
    from slmkit.cli import main

    argv = ["generate", "smollm2-135m", "--prompt", "What is the capital of France?", "--max-new-tokens", "12"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--stream"]) == 0
    assert capsys.readouterr().out == plain and "Paris" in plain


@pytest.mark.parametrize("fields, message", [
    (dict(block_size=12), "block_size must be a power of 2"),
    (dict(num_blocks=1), "num_blocks must be at least 2"),
    (dict(memory_fraction=1.5), r"memory_fraction must be in \(0, 1\]"),
    (dict(max_batch_size=0), "max_batch_size and max_num_batched_tokens must be at least 1"),
    (dict(max_model_len=1), "max_model_len must be at least 2"),
    (dict(speculative_tokens=65), "speculative_tokens must be in 0..64"),
    # wrong types: a TypeError mid-check, or accepted as is
    (dict(block_size="16"), "block_size must be int, got '16'"),
    (dict(max_batch_size=True), "max_batch_size must be int, got True"),
    (dict(memory_fraction="half"), "memory_fraction must be int or float"),
    (dict(cuda_graphs="no"), "cuda_graphs must be bool, got 'no'"),
    (dict(use_kernels=1), "use_kernels must be bool"),
    (dict(graph_batch_sizes=8), "graph_batch_sizes must be a list of batch sizes"),
    (dict(seed="x"), "seed must be int"),
])
def test_bad_engine_config_fails_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**fields)


# Phi-3.5 / Phi-4-mini style LongRoPE, shrunk: short factors up to position 32, long ones past it
LONGROPE = dict(max_position_embeddings=256, original_max_position_embeddings=32, rope_parameters={
    "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
    "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [2.0, 3.0, 4.0, 5.0], "original_max_position_embeddings": 32})


def generate_without_cache(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens, each from a forward over the whole sequence so far: what transformers' ``generate``
    computes for a LongRoPE Phi-3 (which drops its cache when the sequence grows past the switch; transformers
    5.25 does it right, 5.17 fed only the last token at that step), without depending on the version."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def test_longrope_sequences_rotate_as_generate_does_for_each_alone():
    # transformers rotates a Phi-3 sequence longer than 32 tokens with the long factors, its cached keys
    # included, a shorter one with the short factors. Before, the engine picked once per step for the whole
    # batch: a short prompt batched with a long one got the long factors, a long prompt's first chunk the
    # short ones, and a sequence growing past 32 kept its short-rotated keys
    model = peaked("phi3", **LONGROPE)
    engine = Engine(model, SMALL)  # the kernels take cos/sin as given: test_gpu_engine_tiny runs them with this
    assert engine.runner.rope_switch == 32
    batch = prompts(5, 23, 32, 40, 70)  # 48-token steps: the prompts come in chunks
    outs = engine.generate(batch, SamplingParams(max_tokens=40, ignore_eos=True), progress=False)
    for prompt, out in zip(batch, outs):
        assert out.token_ids == generate_without_cache(model, prompt, 40), f"prompt of {len(prompt)} tokens differs"
    assert engine.stats()["long_rope_restarts"] == 3  # 5, 23 and 32 grew past the switch
    # a short prompt must not reuse the cached blocks of a long one that starts the same way
    long, short = prompts(41)[0], prompts(41)[0][:24] + [3, 4, 5]
    for prompt, cached in ((long, 0), (short, 0), (long, 40)):  # long ones share
        out = engine.generate([prompt], SamplingParams(max_tokens=4), progress=False)[0]
        assert out.token_ids == generate_without_cache(model, prompt, 4) and out.cached_prompt_tokens == cached


def test_longrope_speculation_stays_below_the_switch():
    model = peaked("phi3", **LONGROPE)
    engine = Engine(model, dataclasses.replace(SMALL, speculative_tokens=6))
    repetitive = (prompts(9)[0] * 3)[:26]  # prompt lookup finds drafts that would cross position 32
    out = engine.generate([repetitive], SamplingParams(max_tokens=24, ignore_eos=True), progress=False)[0]
    assert out.token_ids == generate_without_cache(model, repetitive, 24)
    assert engine.stats()["long_rope_restarts"] == 1 and engine.stats()["speculative_proposed_tokens"] > 0


def test_dynamic_ntk_rope_within_the_context_equals_generate():
    # the rotary tables stop at the model's context (100 here; the cache's blocks of 8 reach 104): a dynamic
    # NTK module given positions past it rescales every position of the call
    model = peaked("llama", max_position_embeddings=100,
                   rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    engine = Engine(model, SMALL)
    assert engine.max_model_len == 100 and engine.runner.rope_tables[""][0].shape[0] == 100
    assert_same_as_hf(model, engine, prompts(20, 50), max_tokens=40)


def test_rope_switch_length_is_read_from_the_config():
    from slmkit.models.arch import rope_switch_length

    assert rope_switch_length(tiny_config("phi3", **LONGROPE)) == 32
    assert rope_switch_length(tiny_config("phi3")) is None
    assert Engine(peaked("phi3", **LONGROPE), dataclasses.replace(SMALL, max_model_len=32)).runner.rope_switch is None
