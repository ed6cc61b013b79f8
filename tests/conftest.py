"""Shared fixtures: tiny random models built from real transformers config classes, and the real SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels run on the CPU interpreter in tests


def pytest_configure(config):
    """Stop at once, in one line, when this Triton/NumPy pair cannot run the kernels' interpreter tests."""
    from slmkit.kernels._launch import HAVE_TRITON, interpreter_problem, interpreting

    problem = HAVE_TRITON and interpreting() and interpreter_problem()
    if problem:
        raise pytest.UsageError(problem)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "smollm3", "phi3", "granite", "olmo2",
            "olmo3", "exaone4", "hunyuan", "ernie4_5", "helium", "glm", "glm4", "stablelm", "arcee", "apertus",
            "gpt2")


def tiny_config(family: str, vocab_size: int = 256, **overrides):
    """A small config of the real class for ``family`` (2 layers, GQA where the family has it);
    ``overrides`` are more config arguments (e.g. ``sliding_window``)."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                       **overrides)
    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
               "gemma": "GemmaConfig", "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig",
               "smollm3": "SmolLM3Config", "phi3": "Phi3Config", "granite": "GraniteConfig",
               "olmo2": "Olmo2Config", "exaone4": "Exaone4Config",
               "hunyuan": "HunYuanDenseV1Config", "olmo3": "Olmo3Config", "ernie4_5": "Ernie4_5Config",
               "helium": "HeliumConfig", "glm": "GlmConfig", "glm4": "Glm4Config", "stablelm": "StableLmConfig",
               "arcee": "ArceeConfig", "apertus": "ApertusConfig"}
    extra = {"gemma": dict(head_dim=16), "gemma2": dict(head_dim=16), "qwen3": dict(head_dim=16),
             # one sliding block (window 8, so the window matters) and one full block, each with its own
             # rotary base; SmolLM3's second block has no rotary at all
             "gemma3": dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
             "smollm3": dict(no_rope_layers=[1, 0], pad_token_id=0, bos_token_id=1, eos_token_id=2),
             "phi3": dict(pad_token_id=0),
             # Granite-3.x 2B's multipliers (embedding 12, residual 0.22, attention 1/64, logits ÷ 8)
             "granite": dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
                             logits_scaling=8.0),
             "olmo2": dict(pad_token_id=1, eos_token_id=2),
             # a sliding block (window 8) and a full block without rotary (EXAONE-4's global NoPE)
             "exaone4": dict(sliding_window=8, sliding_window_pattern=2),
             "hunyuan": dict(head_dim=16, eod_token_id=3),
             # a sliding block (window 8) and a full one, each kind with its own rotary settings
             "olmo3": dict(pad_token_id=1, eos_token_id=2, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"],
                           rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                            "full_attention": {"rope_type": "default", "rope_theta": 500000.0}}),
             # rotary over interleaved pairs; GLM's over half of each head, with q/k/v biases
             "ernie4_5": dict(head_dim=16), "helium": dict(head_dim=16),
             "glm": dict(head_dim=16, pad_token_id=0), "glm4": dict(head_dim=16, pad_token_id=0),
             # LayerNorms with biases, q/k/v biases, rotary on a quarter of each head (StableLM-2 1.6B)
             "stablelm": dict(use_qkv_bias=True),
             # ungated MLPs: ReLU² (Arcee), xIELU with its learned parameters (Apertus)
             "arcee": dict(head_dim=16, bos_token_id=1, eos_token_id=2),
             "apertus": dict(bos_token_id=1, eos_token_id=2, pad_token_id=0,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 12e6, "factor": 8.0,
                                              "original_max_position_embeddings": 32, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0})}
    return getattr(transformers, classes[family])(**{**common, **extra.get(family, {}), **overrides})


def tiny_model(family: str, seed: int = 0, vocab_size: int = 256, **overrides):
    """A tiny randomly initialised causal LM of ``family`` in eval mode, float32, with norms perturbed
    (so scale folding into norm weights is really exercised, not folded into all-ones); ``overrides``
    go to :func:`tiny_config` (e.g. ``num_hidden_layers=4``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, **overrides), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def assert_ordinary_modes(directory):
    """The directory and every file in it have the modes mkdir / open give under the umask (shared by tests)."""
    mask = _umask()
    assert directory.stat().st_mode & 0o777 == 0o777 & ~mask
    for file in directory.rglob("*"):
        assert file.stat().st_mode & 0o777 == (0o777 if file.is_dir() else 0o666) & ~mask, file.name


def torchrun(worker, args: list, port: int, fails: bool = False) -> None:
    """Run ``worker`` (a script) under ``torchrun --nproc_per_node 2`` on the CPU (gloo), one thread per
    process; assert it fails exactly when ``fails`` (the stderr tail is the assertion message)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    runner = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if runner is None:
        pytest.fail("torchrun (installed with torch) not found")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([runner, "--nproc_per_node", "2", "--master_port", str(port), str(worker),
                             *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
    assert (result.returncode != 0) == fails, result.stderr[-3000:]


def random_tokens(batch: int, length: int, vocab_size: int = 256, seed: int = 0) -> torch.Tensor:
    """Random token ids (batch, length)."""
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def smollm2_path():
    """Directory of the real SmolLM2-135M-Instruct (dequantized from the embedded GGUF, cached)."""
    from slmkit import _assets
    from slmkit.models.loading import convert_gguf, embedded_gguf_path

    return convert_gguf(embedded_gguf_path("smollm2-135m"), _assets.cache_dir() / "models" / "smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def gpu_skip_reason(cuda_available: bool, interpreted: bool) -> str | None:
    """Why the ``gpu`` tests cannot run here, or None. They check the compiled kernels, so under
    TRITON_INTERPRET=1 (this conftest's default, for the CPU tests) they would only re-test the interpreter."""
    if not cuda_available:
        return "needs a CUDA GPU"
    if interpreted:
        return "GPU tests check compiled kernels: run them with TRITON_INTERPRET=0 (scripts/gpu_bench.sh does)"
    return None


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly (with a reason) where CUDA is not available or kernels are interpreted."""
    from slmkit.kernels._launch import interpreting

    reason = gpu_skip_reason(torch.cuda.is_available(), interpreting())
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
