"""Recipes: an ordered list of step configs, plus which model, calibration text and evaluation to use.

A recipe file (YAML) looks like::

    model: smollm2-135m            # any load_model source
    calibration: {num_blocks: 64, block_len: 512}   # a DataConfig (calibration split by default;
                                                    # source: generated = text the model writes,
                                                    # embedded+generated = half of each)
    evaluation: {max_tokens: 16384, seq_len: 1024}  # an EvalConfig, or null to skip
    steps:
      - smoothquant: {alpha: 0.5}

Everything is validated before any work: unknown keys fail naming the key and the allowed ones.
``run_recipe`` loads the model, applies the steps, evaluates against the original model and saves.
After each step the model is checkpointed in ``<output>.partial/``; running the same recipe to the same
output again resumes after the last finished step (after a crash or Ctrl-C).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from slmkit._files import ensure_new
from slmkit.config import BaseConfig, ConfigError, StepContext, apply_step, config_from_step, lookup
from slmkit.data import DataConfig, calibration_blocks, load_calibration_texts, load_texts
from slmkit.errors import SlmkitError
from slmkit.eval import EvalConfig, EvalReport, evaluate
from slmkit.models.checkpoint import save
from slmkit.models.loading import DEFAULT_MODEL, load_model
from slmkit.models.record import get_record

RECIPE_KEYS = ("model", "calibration", "evaluation", "steps")


@dataclasses.dataclass
class Recipe:
    """A validated recipe."""

    steps: list[BaseConfig]
    model: str = DEFAULT_MODEL
    calibration: DataConfig = dataclasses.field(default_factory=DataConfig)
    evaluation: EvalConfig | None = dataclasses.field(default_factory=EvalConfig)
    name: str = "recipe"

    @classmethod
    def from_dict(cls, data: Any, name: str = "recipe") -> "Recipe":
        """Validate a parsed recipe; errors name the offending key and the allowed values."""
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: a recipe must be a mapping with keys {', '.join(RECIPE_KEYS)}")
        unknown = sorted(set(data) - set(RECIPE_KEYS))
        if unknown:
            raise ConfigError(f"{name}: unknown key {unknown[0]!r}; allowed keys: {', '.join(RECIPE_KEYS)}")
        steps = data.get("steps")
        if not isinstance(steps, list) or not steps:
            raise ConfigError(f"{name}: 'steps' must be a non-empty list of steps like '- smoothquant: {{alpha: 0.5}}'")
        model = data.get("model", DEFAULT_MODEL)
        if not isinstance(model, str):
            raise ConfigError(f"{name}.model: expected a model source string, got {model!r}")
        evaluation = data.get("evaluation", {})
        return cls(
            steps=[config_from_step(step, f"{name}.steps[{i}]") for i, step in enumerate(steps)],
            model=model,
            calibration=DataConfig.from_dict(data.get("calibration"), where=f"{name}.calibration"),
            evaluation=None if evaluation is None else EvalConfig.from_dict(evaluation, where=f"{name}.evaluation"),
            name=name,
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Recipe":
        """Read and validate a YAML recipe file."""
        path = Path(path)
        if not path.is_file():
            raise SlmkitError(f"{path}: no such recipe file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise SlmkitError(f"{path}: invalid YAML ({str(error).splitlines()[0]})") from None
        return cls.from_dict(data, name=path.name)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what a recipe file holds)."""
        return {
            "model": self.model,
            "calibration": self.calibration.to_dict(),
            "evaluation": None if self.evaluation is None else self.evaluation.to_dict(),
            "steps": [{step.name: step.to_dict()} for step in self.steps],
        }

    def fingerprint(self) -> str:
        """Hash of the recipe's content, to refuse resuming a different recipe's partial run."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass
class RecipeResult:
    """What run_recipe produced."""

    model: Any
    output: Path | None
    report: EvalReport | None
    seconds: dict[str, float]  # wall time per phase

    def table(self) -> str:
        """The evaluation table plus timings."""
        lines = [self.report.table()] if self.report else []
        lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        if self.output:
            lines.append(f"saved: {self.output}")
        return "\n".join(lines)


def _partial_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def _resume_point(partial: Path, recipe: Recipe, overwrite: bool) -> int:
    """How many steps a previous interrupted run of this recipe finished (0 when starting afresh)."""
    state_file = partial / "state.json"
    if not partial.exists():
        return 0
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("fingerprint") == recipe.fingerprint() and (partial / "checkpoint").is_dir():
        return int(state.get("completed_steps", 0))
    if overwrite:
        shutil.rmtree(partial)
        return 0
    raise SlmkitError(f"{partial} holds a partial run of a different recipe; delete it or pass --overwrite")


def _is_main_process() -> bool:
    """False in the other processes of an ``accelerate launch`` run (only the main one writes files)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def _wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _check_texts(recipe: Recipe) -> dict[str, list[str]] | None:
    """Fail before any model work when the calibration or evaluation text is missing or empty.

    Returns the calibration documents per source (None when no step calibrates), so they are read only once.
    """
    if recipe.evaluation is not None:
        load_texts(recipe.evaluation.source, recipe.evaluation.split)
    for step in recipe.steps:  # steps that read their own text (distillation's training and held-out text)
        for text in (getattr(step, "data", None), getattr(step, "eval", None)):
            if text is not None:
                load_texts(text.source, text.split)
    if any(lookup(step).needs_calibration for step in recipe.steps):
        return load_calibration_texts(recipe.calibration)
    return None


def run_recipe(recipe: Recipe | str | os.PathLike, output: str | os.PathLike | None = None,
               overwrite: bool = False, model: str | None = None, device: str = "cpu") -> RecipeResult:
    """Run a recipe: load → steps → evaluate against the original → save.

    Args:
        recipe: a Recipe or the path of a YAML recipe.
        output: checkpoint directory to write (None: do not save; no resume either).
        overwrite: replace an existing output.
        model: override the recipe's model source.
        device: where to run ("cpu", "cuda").

    Example:
        >>> result = slmkit.run_recipe("recipes/smollm2-w8a8.yaml", output="out/smollm2-w8a8")
        >>> print(result.table())
    """
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_file(recipe)
    if model is not None:
        recipe = dataclasses.replace(recipe, model=model)
    from accelerate import PartialState

    if PartialState().num_processes > 1 and device != "cpu":
        device = str(PartialState().device)  # under `accelerate launch`: this process's GPU
    output = ensure_new(output, overwrite) if output is not None else None
    partial = _partial_dir(output) if output is not None else None
    done = _resume_point(partial, recipe, overwrite) if partial is not None else 0
    seconds: dict[str, float] = {}
    calib_texts = _check_texts(recipe)

    start = time.perf_counter()
    if done:
        print(f"slmkit: resuming {recipe.name} after step {done} of {len(recipe.steps)} from {partial}")
        current = load_model(partial / "checkpoint", device=device)
    else:
        current = load_model(recipe.model, device=device)
    seconds["load"] = time.perf_counter() - start

    calib = None
    for index, step in enumerate(recipe.steps):
        if index < done:
            continue
        start = time.perf_counter()
        if lookup(step).needs_calibration and calib is None:
            calib = calibration_blocks(current, recipe.calibration, calib_texts)
        print(f"slmkit: step {index + 1}/{len(recipe.steps)}: {step.name} {json.dumps(step.to_dict())}")
        # a step with its own resumable state (distillation) keeps it under the partial directory
        work_dir = partial / f"step-{index + 1}-{step.name}" if partial is not None else None
        apply_step(current, step, calib, context=StepContext(recipe.model, work_dir, device))
        seconds[f"step {index + 1} {step.name}"] = time.perf_counter() - start
        if partial is not None and index + 1 < len(recipe.steps) and _is_main_process():
            save(current, partial / "checkpoint", overwrite=True)
            (partial / "state.json").write_text(
                json.dumps({"fingerprint": recipe.fingerprint(), "completed_steps": index + 1}) + "\n"
            )
            if work_dir is not None and work_dir.exists():
                shutil.rmtree(work_dir)  # the step's result is in the checkpoint now
        _wait_for_everyone()

    report = None
    if recipe.evaluation is not None:
        start = time.perf_counter()
        reference = load_model(recipe.model, device=device)
        report = evaluate(current, reference=reference, config=recipe.evaluation)
        del reference
        seconds["evaluate"] = time.perf_counter() - start
    get_record(current).metrics["recipe"] = recipe.to_dict()
    get_record(current).metrics["seconds"] = seconds
    if output is not None and _is_main_process():
        start = time.perf_counter()
        save(current, output, overwrite=overwrite)
        seconds["save"] = time.perf_counter() - start
        if partial.exists():
            shutil.rmtree(partial)
    _wait_for_everyone()
    return RecipeResult(current, output, report, seconds)
