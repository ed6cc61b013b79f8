import pytest
import torch
from transformers import AutoConfig

from slmkit.bench.models import RANDOM_CONFIGS, load_bench_model, random_model
from slmkit.errors import SlmkitError


def test_random_smollm2_has_the_embedded_model_shape(smollm2_path):
    real = AutoConfig.from_pretrained(smollm2_path)
    for field, value in RANDOM_CONFIGS["smollm2-135m"].items():
        # transformers 5 keeps rope_theta in rope_parameters
        actual = real.rope_parameters["rope_theta"] if field == "rope_theta" else getattr(real, field)
        assert actual == pytest.approx(value, rel=1e-6), field  # GGUF stores rms_norm_eps in float32
    model = random_model("random:smollm2-135m", "bfloat16", "meta")  # shapes only, no memory
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.bfloat16 and model.config._name_or_path == "random:smollm2-135m"


def test_random_weights_are_seeded():
    first, second = (load_bench_model("random:smollm2-135m", torch.float32, "cpu") for _ in range(2))
    assert torch.equal(first.model.layers[3].mlp.up_proj.weight, second.model.layers[3].mlp.up_proj.weight)


def test_unknown_random_model_is_refused():
    with pytest.raises(SlmkitError, match="unknown random model 'gpt-5'; known: llama-1b, smollm2-135m"):
        random_model("random:gpt-5", "float32", "cpu")
