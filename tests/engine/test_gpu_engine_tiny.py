"""The engine on a CUDA GPU with tiny random models (no checkpoint needed, so it runs on any GPU box):
Triton kernels, CUDA graphs and bfloat16, against transformers' forward (skipped without CUDA).

Tolerance as in test_gpu_engine.py: every token the engine picks must be HF's argmax within 0.5 logits
under teacher forcing, for at least 97% of the tokens."""

import pytest
import torch

from slmkit.engine import Engine, EngineConfig, SamplingParams
from tests.engine.test_engine import peaked, prompts

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family, config", [("llama", {}), ("qwen3", {}), ("gemma2", dict(sliding_window=16)),
                                            ("gemma3", dict(sliding_window=16)), ("smollm3", {})])
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
