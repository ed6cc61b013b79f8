"""Text generation with Hugging Face ``generate`` (greedy or sampled, chat template when available).

The simple, always-correct path: the KV-cache engine (``slmkit.Engine``, which serves and streams) is
checked against it.
"""

from __future__ import annotations

import torch
from torch import nn

from slmkit.errors import SlmkitError
from slmkit.models.record import get_record, require_model


def generate(model: nn.Module, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, chat: bool = True) -> str:
    """Continue ``prompt`` and return only the new text.

    Args:
        model: a model from ``load_model`` (its tokenizer is used).
        prompt: the user text.
        max_new_tokens: how many tokens to generate at most (stops early at EOS).
        temperature: 0 for greedy decoding; above 0 samples with this temperature.
        top_p: nucleus sampling mass (sampling only).
        top_k: keep the k most likely tokens, 0 for all (sampling only).
        seed: sampling seed (same seed, same text).
        chat: wrap the prompt in the tokenizer's chat template when it has one.

    Example:
        >>> slmkit.generate(model, "What is the capital of France?", max_new_tokens=20)
    """
    require_model(model, "slmkit.generate")
    tokenizer = get_record(model).tokenizer
    if tokenizer is None:
        raise SlmkitError("this model has no tokenizer to turn the prompt into tokens")
    if max_new_tokens < 1:
        raise SlmkitError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    from slmkit.engine.sampling import SamplingParams

    SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)  # the engine's checks, one place
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    device = next(model.parameters()).device
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    if inputs["input_ids"].shape[1] == 0:  # as the engine says; HF generate would fail deep in attention
        raise SlmkitError("the prompt is empty: give at least one token")
    sampling = temperature > 0
    options = dict(do_sample=sampling, max_new_tokens=max_new_tokens,
                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if sampling:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)
        torch.manual_seed(seed)
    else:  # make greedy explicit, whatever the checkpoint's generation_config says
        options.update(temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        output = model.generate(**inputs, **options)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
