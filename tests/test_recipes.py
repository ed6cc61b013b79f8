import dataclasses
import json

import pytest

import slmkit
from slmkit.config import BaseConfig, ConfigError, register
from slmkit.errors import SlmkitError
from slmkit.recipes import Recipe, run_recipe
from tests.conftest import tiny_model


@dataclasses.dataclass
class FlakyConfig(BaseConfig):
    """A test-only step that fails while ``FAIL['now']`` is set (simulates a crash mid-recipe)."""

    name = "test_flaky"
    category = "quantize"
    label: str = "x"


FAIL = {"now": False, "calls": 0}


@register(FlakyConfig)
def flaky(model, config):
    FAIL["calls"] += 1
    if FAIL["now"]:
        raise KeyboardInterrupt
    return model


@pytest.fixture
def tiny_dir(tmp_path, smollm2_tokenizer):
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    model.save_pretrained(tmp_path / "tiny")
    smollm2_tokenizer.save_pretrained(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"line {i} of some calibration and evaluation text." for i in range(400)))
    return tmp_path / "tiny", text


def _recipe(model_dir, text, steps):
    return {
        "model": str(model_dir),
        "calibration": {"source": str(text), "split": "all", "num_blocks": 4, "block_len": 32},
        "evaluation": {"source": str(text), "split": "all", "max_tokens": 128, "seq_len": 64},
        "steps": steps,
    }


@pytest.mark.parametrize("data, message", [
    ({"steps": [{"smoothquant": {"alpha": 2}}]}, r"recipe.steps\[0\].smoothquant: alpha must be in \[0.0, 1.0\]"),
    ({"steps": [{"smoothquant": {"beta": 1}}]}, r"unknown key 'beta'; allowed keys: alpha"),
    ({"steps": [{"prune_magic": {}}]}, r"unknown step 'prune_magic'"),
    ({"steps": []}, r"'steps' must be a non-empty list"),
    ({"stepz": []}, r"unknown key 'stepz'; allowed keys: model, calibration, evaluation, steps"),
    ({"steps": [{"smoothquant": {}}], "calibration": {"blocks": 3}}, r"recipe.calibration: unknown key 'blocks'"),
    ({"steps": [{"smoothquant": {}}], "evaluation": {"seq_len": 0}}, r"recipe.evaluation: seq_len must be"),
])
def test_validation_names_the_offending_key(data, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict(data)


def test_shipped_recipes_validate():
    from pathlib import Path

    recipes = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        recipe = Recipe.from_file(path)
        assert recipe.steps


def test_run_evaluates_and_saves(tiny_dir, tmp_path):
    model_dir, text = tiny_dir
    recipe = Recipe.from_dict(_recipe(model_dir, text, [{"smoothquant": {"alpha": 0.5}}]))
    result = run_recipe(recipe, output=tmp_path / "out")
    assert result.report.kl_mean is not None and result.report.weight_bytes < result.report.reference_weight_bytes
    manifest = json.loads((tmp_path / "out" / "slmkit.json").read_text())
    assert manifest["metrics"]["eval"]["kl_mean"] == result.report.kl_mean
    assert manifest["metrics"]["recipe"]["steps"] == [{"smoothquant": slmkit.SmoothQuantConfig().to_dict()}]
    with pytest.raises(SlmkitError, match="already exists"):
        run_recipe(recipe, output=tmp_path / "out")
    assert "perplexity" in result.table()


def test_interrupted_run_resumes_after_the_last_finished_step(tiny_dir, tmp_path):
    model_dir, text = tiny_dir
    recipe = Recipe.from_dict(_recipe(model_dir, text, [{"smoothquant": {}}, {"test_flaky": {}}]))
    FAIL.update(now=True, calls=0)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, output=tmp_path / "out")
    partial = tmp_path / "out.partial"
    assert json.loads((partial / "state.json").read_text())["completed_steps"] == 1
    assert not (tmp_path / "out").exists()
    FAIL["now"] = False
    result = run_recipe(recipe, output=tmp_path / "out")
    assert FAIL["calls"] == 2 and not partial.exists()
    steps = json.loads((tmp_path / "out" / "slmkit.json").read_text())["steps"]
    assert [next(iter(s)) for s in steps] == ["smoothquant", "test_flaky"]  # smoothquant ran once, then resumed
    assert result.report is not None
    other = Recipe.from_dict(_recipe(model_dir, text, [{"smoothquant": {"alpha": 0.6}}, {"test_flaky": {}}]))
    FAIL["now"] = True
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, output=tmp_path / "out2")
    with pytest.raises(SlmkitError, match="partial run of a different recipe"):
        run_recipe(other, output=tmp_path / "out2")
