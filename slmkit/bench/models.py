"""Models for speed benchmarks: any ``load_model`` source, or random weights of a named real shape.

Speed does not depend on the weights' values, so ``random:NAME`` benchmarks a model's exact shape
without its checkpoint (a 1B model nobody downloaded, or SmolLM2 on a GPU box without the embedded GGUF).
"""

from __future__ import annotations

import torch

from slmkit.errors import SlmkitError

RANDOM_CONFIGS = {
    # the shape of Llama-3.2-1B (1.24B parameters)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=8192,
                     rope_theta=500000.0, tie_word_embeddings=True),
    # the shape of SmolLM2-135M (the embedded default, 135M parameters)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}


def random_model(name: str, dtype: str | torch.dtype, device: str | torch.device):
    """A randomly initialised (seeded) Llama of a named real shape: ``random:llama-1b``, ``random:smollm2-135m``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slmkit.models.loading import parse_dtype

    key = name.split(":", 1)[1]
    if key not in RANDOM_CONFIGS:
        raise SlmkitError(f"unknown random model {key!r}; known: {', '.join(RANDOM_CONFIGS)}")
    torch.manual_seed(0)
    config = LlamaConfig(**RANDOM_CONFIGS[key])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype))
    model.config._name_or_path = name
    return model.eval()


def load_bench_model(source: str, dtype: str | torch.dtype, device: str | torch.device):
    """``random:NAME`` → :func:`random_model`; anything else → ``slmkit.load_model(source, dtype, device)``."""
    if source.startswith("random:"):
        return random_model(source, dtype, device)
    from slmkit.models.loading import load_model

    return load_model(source, dtype=dtype, device=device)
