import dataclasses
import json

import pytest
import torch
import yaml

import slmkit
from slmkit.config import BaseConfig, ConfigError, register
from slmkit.errors import SlmkitError
from slmkit.recipes import Recipe, apply_overrides, run_recipe
from tests.conftest import tiny_model


@dataclasses.dataclass
class FlakyConfig(BaseConfig):
    """A test-only step that fails while ``FAIL['now']`` is set (simulates a crash mid-recipe)."""

    name = "test_flaky"
    category = "quantize"
    runs_on_quantized = True  # it changes nothing, so it may follow a quantize step
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
    ({"steps": [{"rtn": {}}, {"gptq": {}}]},
     r"recipe.steps\[1\]: gptq cannot run on the model steps\[0\] \(rtn\) quantized; put the quantize step last"),
    ({"steps": [{"wanda": {"sparsity": 0.5}}, {"smoothquant": {}}, {"width": {"ffn": 0.25}}]},
     r"recipe.steps\[2\]: width cannot run on the model steps\[1\] \(smoothquant\) quantized"),
    ({"steps": [{"gptq": {}}, {"distill": {}}]}, r"recipe.steps\[1\]: distill cannot run"),
    ({"stepz": []}, r"unknown key 'stepz'; allowed keys: model, calibration, evaluation, steps"),
    ({"steps": [{"smoothquant": {}}], "calibration": {"blocks": 3}}, r"recipe.calibration: unknown key 'blocks'"),
    ({"steps": [{"smoothquant": {}}], "evaluation": {"seq_len": 0}}, r"recipe.evaluation: seq_len must be"),
])
def test_validation_names_the_offending_key(data, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict(data)


WIDTH = {"width": {"ffn": 0.25}}
DISTILL = {"distill": {"steps": 150, "data": {"block_len": 128}}}
TWO_STEPS = {"model": "smollm2-135m", "steps": [WIDTH, DISTILL]}


@pytest.mark.parametrize("overrides, expected", [
    (["distill.steps=2000"], {"steps": [WIDTH, {"distill": {"steps": 2000, "data": {"block_len": 128}}}]}),
    (["distill.data.block_len=512", "distill.learning_rate=3e-4", "distill.eval={max_tokens: 2048}"],
     {"steps": [WIDTH, {"distill": {"steps": 150, "data": {"block_len": 512},
                                         "learning_rate": 3e-4, "eval": {"max_tokens": 2048}}}]}),
    (["steps[0].ffn=0.5", "steps[0].importance=taylor"],
     {"steps": [{"width": {"ffn": 0.5, "importance": "taylor"}}, DISTILL]}),
    (["calibration.num_blocks=8", "model=./other", "evaluation=null"],
     {"calibration": {"num_blocks": 8}, "model": "./other", "evaluation": None}),
])
def test_overrides_set_recipe_and_step_fields(overrides, expected):
    got = apply_overrides(TWO_STEPS, overrides)
    assert got == {**TWO_STEPS, **expected}
    assert TWO_STEPS == {"model": "smollm2-135m", "steps": [{"width": {"ffn": 0.25}}, {"distill": {
        "steps": 150, "data": {"block_len": 128}}}]}  # the input is not modified
    Recipe.from_dict(got)  # and the result is a valid recipe


@pytest.mark.parametrize("data, override, message", [
    (TWO_STEPS, "distill.steps", r"is not KEY.PATH=VALUE"),
    (TWO_STEPS, "distill..steps=3", r"is not KEY.PATH=VALUE"),
    (TWO_STEPS, "smoothquant.alpha=0.5", r"'smoothquant' is neither a recipe key \(model, calibration, evaluation\) "
                                         r"nor a step of this recipe \(width, distill\)"),
    (TWO_STEPS, "steps[2].ffn=0.5", r"the recipe has steps\[0\] to steps\[1\]"),
    (TWO_STEPS, "distill=3", r"name a field of the step, e.g. distill.FIELD=VALUE"),
    (TWO_STEPS, "distill.steps.count=3", r"'steps' is 150, not a mapping"),
    (TWO_STEPS, "distill.steps=[1", r"the value is not valid YAML"),
    ({"steps": [{"width": {"ffn": 0.1}}, {"width": {"heads": 0.1}}]}, "width.ffn=0.2",
     r"has 2 'width' steps; name one by position, e.g. steps\[1\].ffn=..."),
])
def test_bad_overrides_fail_naming_the_override(data, override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(data, [override])


@pytest.mark.parametrize("text, value", [("3e-4", 3e-4), ("1.5e-1", 0.15), ("+2E+0", 2.0), ("0.5", 0.5),
                                         ("7", 7), ("1e", "1e"), ("e5", "e5"), ("x3e4", "x3e4")])
def test_exponent_notation_reads_as_a_number_in_files_and_overrides(tmp_path, text, value):
    path = tmp_path / "r.yaml"
    path.write_text(f"steps:\n  - distill: {{learning_rate: {text}}}\n")
    for recipe in (lambda: Recipe.from_file(path), lambda: Recipe.from_file(path, [f"distill.learning_rate={text}"])):
        if isinstance(value, str):
            with pytest.raises(ConfigError, match="learning_rate"):
                recipe()
        else:
            got = recipe().steps[0].learning_rate
            assert got == value and type(got) is type(value)
    assert yaml.safe_load("a: 3e-4") == {"a": "3e-4"}  # PyYAML's own loader is left as it is


def test_an_override_is_validated_with_the_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps:\n  - smoothquant:\n")  # a step without a mapping takes one from an override
    assert Recipe.from_file(path, ["smoothquant.alpha=0.7"]).steps[0].alpha == 0.7
    with pytest.raises(ConfigError, match=r"r.yaml.steps\[0\].smoothquant: unknown key 'alpah'"):
        Recipe.from_file(path, ["smoothquant.alpah=0.7"])
    with pytest.raises(ConfigError, match=r"alpha must be in \[0.0, 1.0\]"):
        Recipe.from_file(path, ["smoothquant.alpha=7"])


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


@pytest.mark.parametrize("family", ["gemma3", "smollm3", "granite", "olmo2", "olmo3", "exaone4", "hunyuan",
                                    "ernie4_5", "helium", "glm", "glm4", "stablelm", "arcee", "apertus"])
def test_a_recipe_runs_on_a_local_directory_of_a_newer_family(family, tmp_path, smollm2_tokenizer):
    # a transformers directory of the family (random weights, a real tokenizer) → W4A16 GPTQ, evaluated and
    # saved; the checkpoint reloads exactly and the engine's greedy tokens equal generate's on it
    from slmkit.engine import Engine, SamplingParams

    model = tiny_model(family, vocab_size=len(smollm2_tokenizer))
    model.save_pretrained(tmp_path / family)
    smollm2_tokenizer.save_pretrained(tmp_path / family)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"line {i} of some calibration and evaluation text." for i in range(400)))
    recipe = Recipe.from_dict(_recipe(tmp_path / family, text, [{"gptq": {"group_size": 16}}]))
    result = run_recipe(recipe, output=tmp_path / "out")
    assert 0 < result.report.kl_mean and result.report.weight_bytes < result.report.reference_weight_bytes
    loaded = slmkit.load_model(tmp_path / "out")
    prompt = smollm2_tokenizer("Once upon a time")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(torch.tensor([prompt])).logits, result.model(torch.tensor([prompt])).logits)
        expected = loaded.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    out = Engine(loaded).generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True), progress=False)[0]
    assert out.token_ids == expected[0, len(prompt):].tolist()


def test_mixed_calibration_source_feeds_the_step_and_bad_parts_fail_first(tiny_dir, tmp_path, monkeypatch):
    model_dir, text = tiny_dir
    data = _recipe(model_dir, text, [{"gptq": {"group_size": 16}}])
    data["calibration"]["source"] = f"{text}+generated"
    seen = {}
    real = slmkit.recipes.apply_step

    def spy(model, step, calib, **kwargs):
        seen["calib"] = calib
        return real(model, step, calib, **kwargs)

    monkeypatch.setattr(slmkit.recipes, "apply_step", spy)
    run_recipe(Recipe.from_dict(data))
    assert seen["calib"].shape == (4, 32)
    from slmkit.data import calib_data

    model = slmkit.load_model(model_dir)
    assert torch.equal(seen["calib"][2:], calib_data(model, n=2, seq_len=32, source="generated"))
    data["calibration"]["source"] = f"{tmp_path / 'missing.txt'}+generated"
    with pytest.raises(SlmkitError, match="no such text file"):
        run_recipe(Recipe.from_dict(data))



@pytest.mark.parametrize("section, key, message", [
    ("evaluation", "seq_len", r"the evaluation window \(evaluation.seq_len\) is 512 tokens, above the model's "
                              r"maximum of 256"),
    ("calibration", "block_len", r"a calibration block \(calibration.block_len\) is 512 tokens, above the model's "
                                 r"maximum of 256"),
])
def test_windows_longer_than_the_model_fail_before_the_first_step(tiny_dir, section, key, message, monkeypatch):
    model_dir, text = tiny_dir
    data = _recipe(model_dir, text, [{"wanda": {"sparsity": 0.5}}, {"gptq": {"group_size": 16}}])
    data[section][key] = 512
    data["evaluation"]["max_tokens"] = 512
    ran = []
    monkeypatch.setattr(slmkit.recipes, "apply_step", lambda model, step, *args, **kwargs: ran.append(step))
    with pytest.raises(SlmkitError, match=message):
        run_recipe(Recipe.from_dict(data))
    assert ran == []  # refused before any step ran


@pytest.mark.parametrize("distill, message", [
    ({"data": {"block_len": 512}}, r"steps\[1\].distill data.block_len is 512 tokens, above the model's "
                                   r"maximum of 256"),
    ({"eval": {"seq_len": 300, "max_tokens": 600}}, r"steps\[1\].distill eval.seq_len is 300 tokens"),
    ({"mode": "on_policy", "prompt_len": 200, "max_new_tokens": 100},
     r"steps\[1\].distill prompt_len \+ max_new_tokens is 300 tokens"),
])
def test_a_later_steps_lengths_are_checked_before_the_first_step(tiny_dir, distill, message, monkeypatch):
    model_dir, text = tiny_dir
    fields = {"steps": 2, "data": {"block_len": 64}, "eval": {"seq_len": 64, "max_tokens": 128}, **distill}
    data = _recipe(model_dir, text, [{"width": {"ffn": 0.25}}, {"distill": fields}])
    ran = []
    monkeypatch.setattr(slmkit.recipes, "apply_step", lambda model, step, *args, **kwargs: ran.append(step))
    with pytest.raises(SlmkitError, match=message):
        run_recipe(Recipe.from_dict(data))
    assert ran == []  # the pruning did not run first


def _interrupted_after_smoothquant(tiny_dir, output):
    """Run [smoothquant, test_flaky] to ``output`` with test_flaky interrupting; returns the recipe."""
    model_dir, text = tiny_dir
    recipe = Recipe.from_dict(_recipe(model_dir, text, [{"smoothquant": {}}, {"test_flaky": {}}]))
    FAIL.update(now=True, calls=0)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, output=output)
    return recipe


def test_interrupted_run_resumes_after_the_last_finished_step(tiny_dir, tmp_path):
    model_dir, text = tiny_dir
    recipe = _interrupted_after_smoothquant(tiny_dir, tmp_path / "out")
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



def test_a_run_that_stopped_in_its_evaluation_resumes_with_other_evaluation_settings(tiny_dir, tmp_path,
                                                                                     monkeypatch):
    model_dir, text = tiny_dir
    data = _recipe(model_dir, text, [{"smoothquant": {}}, {"test_flaky": {}}])
    FAIL.update(now=False, calls=0)
    real = slmkit.recipes.evaluate

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(slmkit.recipes, "evaluate", out_of_memory)
    with pytest.raises(MemoryError):
        run_recipe(Recipe.from_dict(data), output=tmp_path / "out")
    assert FAIL["calls"] == 1
    monkeypatch.setattr(slmkit.recipes, "evaluate", real)
    data["evaluation"]["max_tokens"] = 64  # what a user changes after running out of memory there
    result = run_recipe(Recipe.from_dict(data), output=tmp_path / "out")
    assert FAIL["calls"] == 1 and result.report is not None  # no step ran again
    assert not (tmp_path / "out.partial").exists()


def test_a_partial_run_marked_by_an_older_slmkit_still_resumes(tiny_dir, tmp_path):
    # partial runs were marked with a hash that included the evaluation settings
    recipe = _interrupted_after_smoothquant(tiny_dir, tmp_path / "out")
    state = tmp_path / "out.partial" / "state.json"
    state.write_text(json.dumps({"fingerprint": recipe.fingerprint(evaluation=True), "completed_steps": 1}))
    FAIL["now"] = False
    run_recipe(recipe, output=tmp_path / "out")
    assert FAIL["calls"] == 2  # smoothquant did not run again; test_flaky ran once more


def test_a_run_interrupted_inside_its_first_walk_resumes_after_the_last_finished_block(tiny_dir, tmp_path,
                                                                                       monkeypatch, capsys):
    import slmkit.recipes
    from slmkit import calib as calibration

    model_dir, text = tiny_dir
    recipe = Recipe.from_dict(_recipe(model_dir, text, [{"gptq": {"group_size": 16}}, {"test_flaky": {}}]))
    FAIL.update(now=False, calls=0)
    straight = run_recipe(recipe, output=tmp_path / "straight")
    observe = calibration.observe_inputs

    def crash_in_block_1(layer, modules, reduce):
        if layer.index == 1:
            raise KeyboardInterrupt
        return observe(layer, modules, reduce)

    monkeypatch.setattr(calibration, "observe_inputs", crash_in_block_1)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, output=tmp_path / "out")
    partial = tmp_path / "out.partial"
    assert json.loads((partial / "state.json").read_text())["completed_steps"] == 0
    assert [p.name for p in (partial / "step-1-gptq").glob("block-*")] == ["block-0000.safetensors"]
    assert (partial / "calibration.safetensors").is_file()
    monkeypatch.undo()

    def not_again(*args):
        raise AssertionError("a resumed run makes its calibration blocks again")

    monkeypatch.setattr(slmkit.recipes, "calibration_blocks", not_again)  # they are read back
    capsys.readouterr()
    resumed = run_recipe(recipe, output=tmp_path / "out")
    assert "gptq: resuming after block 1 of 2" in capsys.readouterr().out
    monkeypatch.undo()
    assert not partial.exists()
    expected = straight.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    # a different recipe finds the directory of the interrupted one and refuses it, naming --overwrite
    monkeypatch.setattr(calibration, "observe_inputs", crash_in_block_1)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, output=tmp_path / "out2")
    other = Recipe.from_dict(_recipe(model_dir, text, [{"gptq": {"group_size": 32}}, {"test_flaky": {}}]))
    with pytest.raises(SlmkitError, match="partial run of a different recipe; delete it or pass --overwrite"):
        run_recipe(other, output=tmp_path / "out2")


def test_two_processes_resume_a_walk_from_the_blocks_the_main_process_saved(tiny_dir, tmp_path):
    """Under torchrun / ``accelerate launch`` every process walks the blocks; only the main one writes them,
    and every process resumes from them."""
    import hashlib
    from pathlib import Path

    from tests.conftest import torchrun

    model_dir, text = tiny_dir
    data = {**_recipe(model_dir, text, [{"gptq": {"group_size": 16}}]), "evaluation": None}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    straight = run_recipe(Recipe.from_dict(data)).model.state_dict()
    worker = Path(__file__).with_name("recipes_worker.py")
    run = tmp_path / "run"
    run.mkdir()

    def ranks():
        return [json.loads((run / f"rank{rank}.json").read_text()) for rank in range(2)]

    torchrun(worker, [run, tmp_path / "recipe.yaml", "crash"], 29571, fails=True)
    crashed = ranks()
    assert crashed[1]["writes"] == []  # only the main process writes the walk's files
    assert {"block-0000.safetensors", "state.json", "frontier.safetensors"} <= set(crashed[0]["writes"])
    assert [p.name for p in (run / "out.partial" / "step-1-gptq").glob("block-*")] == ["block-0000.safetensors"]

    torchrun(worker, [run, tmp_path / "recipe.yaml", "resume"], 29572)
    resumed = ranks()
    assert [r["walked"] for r in resumed] == [[1], [1]]  # block 0 came from the main process's file
    assert resumed[1]["writes"] == [] and "block-0001.safetensors" in resumed[0]["writes"]
    expected = hashlib.sha256(b"".join(t.numpy().tobytes() for t in straight.values())).hexdigest()
    assert [r["digest"] for r in resumed] == [expected, expected]
    assert (run / "out" / "model.safetensors").is_file() and not (run / "out.partial").exists()


def test_a_run_interrupted_in_its_final_evaluation_does_not_redo_its_steps(tiny_dir, tmp_path, monkeypatch):
    import slmkit.recipes

    model_dir, text = tiny_dir
    recipe = Recipe.from_dict(_recipe(model_dir, text, [{"test_flaky": {}}]))
    FAIL.update(now=False, calls=0)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(slmkit.recipes, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, output=tmp_path / "out")
    monkeypatch.undo()
    result = run_recipe(recipe, output=tmp_path / "out")
    assert FAIL["calls"] == 1 and result.report is not None and not (tmp_path / "out.partial").exists()


def test_a_partial_directory_that_saved_no_work_does_not_block_another_recipe(tiny_dir, tmp_path):
    model_dir, text = tiny_dir
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "state.json").write_text(json.dumps({"fingerprint": "another recipe", "completed_steps": 0}))
    FAIL.update(now=False, calls=0)
    run_recipe(Recipe.from_dict(_recipe(model_dir, text, [{"test_flaky": {}}])), output=tmp_path / "out")
    assert FAIL["calls"] == 1 and (tmp_path / "out").is_dir() and not partial.exists()


DISTILL_STEP = {"distill": {"steps": 4, "batch_size": 2, "micro_batch_size": 1, "learning_rate": 1e-3,
                            "warmup_steps": 1, "eval_every": 2, "save_every": 1,
                            "data": {"num_blocks": 8, "block_len": 32}, "eval": {"max_tokens": 64, "seq_len": 32}}}


def _distill_recipe(model_dir, text):
    data = _recipe(model_dir, text, [{"width": {"ffn": 0.25}}, DISTILL_STEP])
    for key in ("data", "eval"):  # the step's own text: the test file
        data["steps"][1]["distill"][key] = {**DISTILL_STEP["distill"][key], "source": str(text), "split": "all"}
    return Recipe.from_dict(data)


@pytest.mark.parametrize("installed, message", [(None, "pip install 'slmkit\\[bnb\\]'"),
                                                ("0.49.0", "needs bitsandbytes >= 0.50 \\(this is 0.49.0\\)")])
def test_a_missing_or_old_optional_package_fails_before_the_first_step(tiny_dir, tmp_path, monkeypatch, installed,
                                                                      message):
    import sys
    import types

    model_dir, text = tiny_dir
    recipe = _distill_recipe(model_dir, text)
    recipe.steps[1].optimizer = "adamw_8bit"
    # bitsandbytes as not installed (None in sys.modules fails its import), or as an old version
    monkeypatch.setitem(sys.modules, "bitsandbytes", installed and types.SimpleNamespace(__version__=installed))
    ran = []
    monkeypatch.setattr(slmkit.recipes, "apply_step", lambda model, step, *args, **kwargs: ran.append(step.name))
    with pytest.raises(SlmkitError, match=message):
        run_recipe(recipe, output=tmp_path / "out")
    assert ran == []  # the width step did not run first
    assert not (tmp_path / "out").exists()


def test_prune_then_distill_recipe_resumes_inside_the_distillation(tiny_dir, tmp_path, monkeypatch):
    from slmkit.distill import trainer

    model_dir, text = tiny_dir
    recipe = _distill_recipe(model_dir, text)
    straight = run_recipe(recipe, output=tmp_path / "straight")
    manifest = json.loads((tmp_path / "straight" / "slmkit.json").read_text())
    assert [next(iter(s)) for s in manifest["steps"]] == ["width", "distill"]
    evals = manifest["metrics"]["distill"]["evals"]
    assert [e["step"] for e in evals] == [0, 2, 4]  # learning itself is tested in tests/distill
    assert manifest["steps"][1]["distill"]["teacher"] is None  # the recipe's model taught

    original = trainer.DistillTrainer._micro_batch_loss

    def interrupted(self, batch, on_policy):
        if self.step == 2:
            raise KeyboardInterrupt
        return original(self, batch, on_policy)

    monkeypatch.setattr(trainer.DistillTrainer, "_micro_batch_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, output=tmp_path / "out")
    work = tmp_path / "out.partial" / "step-2-distill"
    assert [d.name for d in trainer.checkpoint_dirs(work)] == ["step-00000001", "step-00000002"]
    monkeypatch.undo()
    resumed = run_recipe(recipe, output=tmp_path / "out")
    assert not (tmp_path / "out.partial").exists()
    expected = straight.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    reloaded = slmkit.load_model(tmp_path / "out")
    assert reloaded.config.intermediate_size == straight.model.config.intermediate_size < 96


@pytest.mark.parametrize("transform_step", [
    {"shared_ffn": {"init": "merge", "merge_steps": 5, "rank": 2}},
    {"layerwise_scaling": {"alpha_min": 0.5, "alpha_max": 1.0, "beta_min": 0.5, "beta_max": 1.5, "multiple_of": 8}},
])
def test_transform_then_distill_recipe_saves_a_model_transformers_loads(tiny_dir, tmp_path, transform_step):
    from transformers import AutoModelForCausalLM

    model_dir, text = tiny_dir
    data = _recipe(model_dir, text, [transform_step, DISTILL_STEP])
    for key in ("data", "eval"):
        data["steps"][1]["distill"][key] = {**DISTILL_STEP["distill"][key], "source": str(text), "split": "all"}
    result = run_recipe(Recipe.from_dict(data), output=tmp_path / "out")
    assert result.report.weight_bytes < result.report.reference_weight_bytes
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(saved).__name__ == "SlmForCausalLM"
    tokens = torch.randint(0, 100, (1, 10))
    loaded = slmkit.load_model(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(saved(tokens).logits, loaded(tokens).logits)
