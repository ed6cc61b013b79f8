import dataclasses

import pytest

import slmkit  # noqa: F401  (registers the built-in transforms)
from slmkit.config import BaseConfig, ConfigError, config_from_step, lookup
from slmkit.quantize import SmoothQuantConfig


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError, match=r"unknown key .alhpa.; allowed keys: alpha, alpha_grid"):
        SmoothQuantConfig.from_dict({"alhpa": 0.5})


@pytest.mark.parametrize("fields, message", [
    ({"alpha": 1.5}, r"alpha must be in \[0.0, 1.0\]"),
    ({"alpha": "high"}, r"alpha must be a float"),
    ({"activations": "per-row"}, r"activations must be one of 'dynamic', 'static'"),
    ({"fold_sites": ["q->k"]}, r"fold_sites\[\] must be one of"),
    ({"skip": ["("]}, r"not a valid regex"),
    ({"smoothing": "yes"}, r"smoothing must be bool"),
])
def test_bad_values_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        SmoothQuantConfig.from_dict(fields)


def test_round_trip_through_dict():
    config = SmoothQuantConfig(alpha=0.7, activations="static", skip=["down_proj"])
    assert SmoothQuantConfig.from_dict(config.to_dict()) == config


def test_step_parsing_and_registry():
    config = config_from_step({"smoothquant": {"alpha": 0.6}}, "steps[0]")
    assert isinstance(config, SmoothQuantConfig) and config.alpha == 0.6
    assert lookup(config).needs_calibration
    with pytest.raises(ConfigError, match=r"unknown step 'smoothqunt'; available steps: .*smoothquant"):
        config_from_step({"smoothqunt": {}}, "steps[0]")
    with pytest.raises(ConfigError, match="exactly one key"):
        config_from_step({"smoothquant": {}, "other": {}}, "steps[0]")


def test_configs_are_dataclasses_with_docstrings():
    assert dataclasses.is_dataclass(SmoothQuantConfig) and issubclass(SmoothQuantConfig, BaseConfig)
    assert SmoothQuantConfig.__doc__


@pytest.mark.parametrize("call, name", [
    (lambda: slmkit.quantize(None, slmkit.RTNConfig()), "slmkit.quantize"),
    (lambda: slmkit.prune("smollm2-135m", slmkit.MagnitudePruneConfig(sparsity=0.5)), "slmkit.prune"),
    (lambda: slmkit.evaluate("smollm2-135m"), "slmkit.evaluate"),
    (lambda: slmkit.save(None, "unused"), "slmkit.save"),
    (lambda: slmkit.export("smollm2-135m", "unused"), "slmkit.export"),
    (lambda: slmkit.generate(None, "hi"), "slmkit.generate"),
    (lambda: slmkit.calib_data("smollm2-135m"), "calib_data"),
    (lambda: slmkit.Engine("smollm2-135m"), "Engine"),
])
def test_public_functions_refuse_what_is_not_a_model(call, name):
    from slmkit.errors import SlmkitError

    with pytest.raises(SlmkitError, match=rf"^{name}: expected a model from slmkit.load_model, got "):
        call()


def test_a_model_source_must_be_a_name_or_path():
    from slmkit.errors import SlmkitError

    with pytest.raises(SlmkitError, match=r"^a model source is a name, path or hub id \(str or path\), got int$"):
        slmkit.load_model(123)  # before any hub request


def test_calibration_ids_outside_the_vocabulary_are_refused_before_any_work():
    import torch

    from slmkit.errors import SlmkitError
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    vocab = model.get_input_embeddings().num_embeddings
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for ids, shown in ((torch.full((2, 16), vocab), f"from {vocab} to {vocab}"), (torch.full((2, 16), -1), "from -1")):
        with pytest.raises(SlmkitError, match=rf"WandaConfig: calibration token ids run {shown}.*outside this model's "
                                              rf"vocabulary \(0..{vocab - 1}\)"):
            slmkit.prune(model, slmkit.WandaConfig(sparsity=0.5), calib=ids)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert "slmkit" not in model.__dict__ or not model.slmkit.steps  # nothing recorded as done


def test_without_calibration_the_embedded_blocks_fit_the_models_context(smollm2_tokenizer, monkeypatch):
    import torch

    from slmkit import config as config_module
    from slmkit.models.record import get_record
    from tests.conftest import tiny_model

    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))  # max_position_embeddings 256, not 512
    get_record(model).tokenizer = smollm2_tokenizer
    seen = {}
    spy = dataclasses.replace(lookup("wanda"), apply=lambda model, config, calib: seen.update(calib=calib))
    monkeypatch.setitem(config_module._REGISTRY, "wanda", spy)
    slmkit.prune(model, slmkit.WandaConfig(sparsity=0.5))  # no calib: the embedded corpus's blocks
    assert isinstance(seen["calib"], torch.Tensor) and seen["calib"].shape == (128, 256)
