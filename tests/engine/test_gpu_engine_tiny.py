"""The engine on a CUDA GPU with tiny random models (no checkpoint needed, so it runs on any GPU box):
Triton kernels, CUDA graphs and bfloat16, against transformers' forward (skipped without CUDA).

Tolerance as in test_gpu_engine.py: every token the engine picks must be HF's argmax within 0.5 logits
under teacher forcing, for at least 97% of the tokens."""

import pytest
import torch

from slmkit.engine import Engine, EngineConfig, SamplingParams
from tests.engine.test_engine import LONGROPE, peaked, prompts

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family, config", [("llama", {}), ("qwen3", {}), ("gemma2", dict(sliding_window=16)),
                                            ("gemma3", dict(sliding_window=16)), ("smollm3", {}), ("granite", {}),
                                            ("olmo2", {}), ("olmo3", dict(sliding_window=16)),
                                            ("exaone4", dict(sliding_window=16)), ("hunyuan", {}), ("ernie4_5", {}),
                                            ("helium", {}), ("glm", {}), ("glm4", {}), ("stablelm", {}),
                                            ("arcee", {}), ("apertus", {})])
@pytest.mark.parametrize("speculative", [0, 4])
def test_bf16_engine_with_kernels_and_graphs_agrees_with_hf(family, config, speculative):
    model = peaked(family, **config).to("cuda", torch.bfloat16)
    engine = Engine(model, EngineConfig(block_size=16, max_batch_size=4, max_model_len=256,
                                        speculative_tokens=speculative))
    assert engine.use_kernels and engine.graph_batch_sizes
    batch = prompts(5, 40, 77)
    outs = engine.generate(batch, SamplingParams(max_tokens=64, ignore_eos=True), progress=False)
    agree = total = 0
    for prompt, out in zip(batch, outs):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out.token_ids], device="cuda")).logits[0, len(prompt) - 1:-1].float()
        chosen = logits.gather(1, torch.tensor(out.token_ids, device="cuda")[:, None])[:, 0]
        agree += int((chosen >= logits.max(dim=1).values - 0.5).sum())
        total += len(out.token_ids)
    assert total == 3 * 64 and agree / total >= 0.97, f"{agree}/{total}"


def agreement_with_generate(model, prompt: list[int], tokens: list[int]) -> int:
    """How many of the engine's ``tokens`` are (within 0.5 logits) the argmax of what ``generate`` computes at
    that step: the logits of a forward over the sequence so far, no cache (for LongRoPE, generate's own
    recomputation when a sequence grows past the switch: every token rotated as the sequence's length says)."""
    agree = 0
    for i, token in enumerate(tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens[:i]], device=model.device)).logits[0, -1].float()
        agree += int(logits[token] >= logits.max() - 0.5)
    return agree


@pytest.mark.parametrize("speculative", [0, 4])
def test_bf16_longrope_engine_with_kernels_and_graphs_agrees_with_generate(speculative):
    model = peaked("phi3", **LONGROPE).to("cuda", torch.bfloat16)
    engine = Engine(model, EngineConfig(block_size=16, max_batch_size=4, max_model_len=256,
                                        speculative_tokens=speculative))
    assert engine.use_kernels and engine.graph_batch_sizes and engine.runner.rope_switch == 32
    batch = prompts(5, 23, 40)  # grows past the switch while decoding (graphs), crosses it, starts past it
    outs = engine.generate(batch, SamplingParams(max_tokens=40, ignore_eos=True), progress=False)
    agree = sum(agreement_with_generate(model, prompt, out.token_ids) for prompt, out in zip(batch, outs))
    assert engine.stats()["long_rope_restarts"] == 2 and agree / (3 * 40) >= 0.97, f"{agree}/120"
