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
``overrides`` (``slmkit run --set``) change a recipe without editing its file, e.g. ``distill.steps=2000``
or ``calibration.num_blocks=128`` (see :func:`apply_overrides`).
``run_recipe`` loads the model, applies the steps, evaluates against the original model and saves.
After each step the model is checkpointed in ``<output>.partial/``; running the same recipe to the same
output again resumes after the last finished step (after a crash or Ctrl-C). Inside a step, distillation
resumes from its last checkpoint, the layer-by-layer walks (SmoothQuant, GPTQ, AWQ, Wanda, SparseGPT)
after their last finished block, the importance walks of width, depth and layer-wise scaling steps after
their last measured block, and a shared-FFN step after its last merged group.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from slmkit._files import ensure_new, save_tensors_atomic, write_text_atomic
from slmkit._processes import is_main_process, process_state, wait_for_everyone
from slmkit.config import BaseConfig, ConfigError, StepContext, apply_step, config_from_step, lookup
from slmkit.data import DataConfig, calibration_blocks, load_calibration_texts, load_texts
from slmkit.errors import SlmkitError, first_line
from slmkit.eval import EvalConfig, EvalReport, evaluate
from slmkit.models.arch import check_context
from slmkit.models.checkpoint import save
from slmkit.models.loading import DEFAULT_MODEL, load_model
from slmkit.models.record import get_record

RECIPE_KEYS = ("model", "calibration", "evaluation", "steps")


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading exponent notation as YAML 1.2 does: ``3e-4`` and ``1.5e3`` are floats
    (YAML 1.1, which PyYAML follows, wants a dot and a signed exponent, and reads these as strings)."""


_RecipeLoader.add_implicit_resolver(  # on this subclass only: yaml.SafeLoader is unchanged
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)


def apply_overrides(data: Any, overrides: list[str] | tuple[str, ...], name: str = "recipe") -> Any:
    """A copy of parsed recipe ``data`` with each ``KEY.PATH=VALUE`` of ``overrides`` set, in order.

    The path starts at a recipe key (``model``, ``calibration``, ``evaluation``), at a step by its name
    when the recipe has one step of that name (``distill.steps=2000``), or at a step by its position
    (``steps[1].steps=2000``, counting from 0 as the recipe's error messages do). The value is read as
    YAML (``2000`` and ``3e-4`` are numbers, ``true`` a boolean, ``null`` none, ``{source: embedded}`` a
    mapping).
    Mappings on the path that are missing or null are created; the result is validated as a whole by
    :meth:`Recipe.from_dict`, so a misspelt key still fails naming the allowed ones.

    Example:
        >>> apply_overrides({"steps": [{"distill": {"steps": 150}}]}, ["distill.steps=2000"])
        {'steps': [{'distill': {'steps': 2000}}]}
    """
    data = copy.deepcopy(data)
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
        return data  # Recipe.from_dict says what is wrong with it
    for override in overrides:
        key, sep, text = override.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise ConfigError(f"{name}: override {override!r} is not KEY.PATH=VALUE, e.g. distill.steps=2000")
        try:
            value = _load_yaml(text)
        except yaml.YAMLError:
            raise ConfigError(f"{name}: override {override!r}: the value is not valid YAML") from None
        node, rest = _override_root(data, path, name, override)
        for part in rest[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"{name}: override {override!r}: {part!r} is {node[part]!r}, not a mapping")
            node = node[part]
        node[rest[-1]] = value
    return data


def _override_root(data: dict, path: list[str], name: str, override: str) -> tuple[dict, list[str]]:
    """The mapping an override's path starts in, and the rest of the path."""
    head = path[0]
    if head in RECIPE_KEYS and head != "steps":
        return data, path
    steps = data["steps"]
    names = [next(iter(step)) if isinstance(step, dict) and len(step) == 1 else None for step in steps]
    if head.startswith("steps[") and head.endswith("]"):
        index = head[len("steps["):-1]
        if not index.isdigit() or int(index) >= len(steps):
            raise ConfigError(f"{name}: override {override!r}: the recipe has steps[0] to steps[{len(steps) - 1}]")
        positions = [int(index)]
    else:
        positions = [i for i, step_name in enumerate(names) if step_name == head]
        if not positions:
            known = ", ".join(dict.fromkeys(n for n in names if n))
            raise ConfigError(f"{name}: override {override!r}: {head!r} is neither a recipe key "
                              f"({', '.join(k for k in RECIPE_KEYS if k != 'steps')}) nor a step of this recipe "
                              f"({known})")
        if len(positions) > 1:
            raise ConfigError(f"{name}: override {override!r}: the recipe has {len(positions)} {head!r} steps; "
                              f"name one by position, e.g. steps[{positions[-1]}].{'.'.join(path[1:])}=...")
    if len(path) < 2:
        raise ConfigError(f"{name}: override {override!r}: name a field of the step, e.g. {head}.FIELD=VALUE")
    position = positions[0]
    step_name = names[position]
    if step_name is None:
        raise ConfigError(f"{name}: override {override!r}: steps[{position}] is not a '- name: {{...}}' step")
    if steps[position][step_name] is None:
        steps[position][step_name] = {}
    if not isinstance(steps[position][step_name], dict):
        raise ConfigError(f"{name}: override {override!r}: steps[{position}].{step_name} is not a mapping")
    return steps[position][step_name], path[1:]


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
        configs = [config_from_step(step, f"{name}.steps[{i}]") for i, step in enumerate(steps)]
        _check_order(configs, name)
        return cls(
            steps=configs,
            model=model,
            calibration=DataConfig.from_dict(data.get("calibration"), where=f"{name}.calibration"),
            evaluation=None if evaluation is None else EvalConfig.from_dict(evaluation, where=f"{name}.evaluation"),
            name=name,
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> "Recipe":
        """Read and validate a YAML recipe file, with ``KEY.PATH=VALUE`` overrides (:func:`apply_overrides`)."""
        path = Path(path)
        if not path.is_file():
            raise SlmkitError(f"{path}: no such recipe file")
        try:
            data = _load_yaml(path.read_text())
        except yaml.YAMLError as error:
            raise SlmkitError(f"{path}: invalid YAML ({first_line(error)})") from None
        return cls.from_dict(apply_overrides(data, overrides, path.name), name=path.name)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what a recipe file holds)."""
        return {
            "model": self.model,
            "calibration": self.calibration.to_dict(),
            "evaluation": None if self.evaluation is None else self.evaluation.to_dict(),
            "steps": [{step.name: step.to_dict()} for step in self.steps],
        }

    def fingerprint(self, evaluation: bool = False) -> str:
        """Hash of what the steps' work depends on (model, calibration, steps), to refuse resuming a
        different recipe's partial run. The evaluation runs after every step, so a run that stopped there
        (out of memory with too large an ``evaluation.batch_size``, say) resumes with other evaluation
        settings; ``evaluation=True`` hashes it too (how partial runs were marked before)."""
        content = self.to_dict()
        if not evaluation:
            content.pop("evaluation")
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


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


def _check_order(steps: list[BaseConfig], name: str) -> None:
    """Refuse a step that cannot run on a quantized model after a quantize step: it would fail only once
    the quantization (minutes to hours) had run."""
    quantized = next((i for i, step in enumerate(steps) if step.category == "quantize"), None)
    if quantized is None:
        return
    for index, step in enumerate(steps[quantized + 1:], quantized + 1):
        if not step.runs_on_quantized:
            raise ConfigError(f"{name}.steps[{index}]: {step.name} cannot run on the model steps[{quantized}] "
                              f"({steps[quantized].name}) quantized; put the quantize step last "
                              "(prune → distill → quantize)")


def partial_dir(output: Path) -> Path:
    """Where a recipe run to ``output`` keeps its finished work until it completes (``OUTPUT.partial``)."""
    return output.with_name(output.name + ".partial")


def _resume_point(partial: Path, recipe: Recipe, overwrite: bool) -> int:
    """How many steps a previous interrupted run of this recipe finished (0 when starting afresh)."""
    state_file = partial / "state.json"
    if not partial.exists():
        return 0
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    done = int(state.get("completed_steps", 0))
    same = state.get("fingerprint") in (recipe.fingerprint(), recipe.fingerprint(evaluation=True))
    if same and (done == 0 or (partial / "checkpoint").is_dir()):
        return done  # 0: interrupted inside the first step, whose own state (if any) is in its step directory
    if overwrite or not any(path.name != "state.json" for path in partial.iterdir()):
        shutil.rmtree(partial)  # replaced, or held nothing but the state of a run that saved no work
        return 0
    raise SlmkitError(f"{partial} holds a partial run of a different recipe; delete it or pass --overwrite")


def _write_state(partial: Path, recipe: Recipe, completed: int) -> None:
    """Record in ``partial/state.json`` which recipe the directory belongs to and how many steps it finished."""
    write_text_atomic(partial / "state.json",
                      json.dumps({"fingerprint": recipe.fingerprint(), "completed_steps": completed}) + "\n")


def _calibration(model, recipe: Recipe, texts: dict[str, list[str]] | None, partial: Path | None) -> torch.Tensor:
    """The recipe's calibration blocks, made once per run and kept in ``partial/calibration.safetensors``.

    A resumed run reads them back: text the model generates itself takes minutes to make again, and it
    comes from the model as it was at the first calibrating step, which a resumed run no longer holds.
    """
    from safetensors.torch import load_file

    file = partial / "calibration.safetensors" if partial is not None else None
    if file is not None and file.is_file():
        try:
            return load_file(str(file))["tokens"]
        except Exception as error:  # truncated or foreign file: make the blocks again
            print(f"slmkit: {file} unreadable ({first_line(error, 120)}); making the calibration again")
    calib = calibration_blocks(model, recipe.calibration, texts)
    if file is not None and is_main_process():
        save_tensors_atomic(file, {"tokens": calib.contiguous()})
    return calib


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
    processes = process_state(cpu=device == "cpu")
    if processes.num_processes > 1 and device != "cpu":
        device = str(processes.device)  # under `accelerate launch`: this process's GPU
    output = ensure_new(output, overwrite) if output is not None else None
    partial = partial_dir(output) if output is not None else None
    done = _resume_point(partial, recipe, overwrite) if partial is not None else 0
    seconds: dict[str, float] = {}
    calib_texts = _check_texts(recipe)
    for step in recipe.steps:  # optional packages a later step needs: fail before the first step's work
        step.check_environment(device)

    start = time.perf_counter()
    if done:
        print(f"slmkit: resuming {recipe.name} after step {done} of {len(recipe.steps)} from {partial}")
        current = load_model(partial / "checkpoint", device=device)
    else:
        current = load_model(recipe.model, device=device)
    seconds["load"] = time.perf_counter() - start
    # windows longer than the model takes fail now, not after hours of steps
    if recipe.evaluation is not None:
        check_context(current, recipe.evaluation.seq_len, "the evaluation window (evaluation.seq_len)")
    if any(lookup(step).needs_calibration for step in recipe.steps[done:]):
        check_context(current, recipe.calibration.block_len, "a calibration block (calibration.block_len)")
    for index, step in enumerate(recipe.steps[done:], done):
        for field, length in step.token_lengths().items():
            check_context(current, length, f"steps[{index}].{step.name} {field}")

    calib = None
    for index, step in enumerate(recipe.steps):
        if index < done:
            continue
        start = time.perf_counter()
        if partial is not None and not (partial / "state.json").is_file() and is_main_process():
            _write_state(partial, recipe, 0)  # so a run interrupted inside this step is recognised
        if lookup(step).needs_calibration and calib is None:
            calib = _calibration(current, recipe, calib_texts, partial)
        print(f"slmkit: step {index + 1}/{len(recipe.steps)}: {step.name} {json.dumps(step.to_dict())}")
        # a step with its own resumable state (distillation, a layer-by-layer walk's finished blocks) keeps
        # it under the partial directory (in a multi-process run the main process writes it, all read it)
        work_dir = partial / f"step-{index + 1}-{step.name}" if partial is not None else None
        apply_step(current, step, calib, context=StepContext(recipe.model, work_dir, device), checkpoint_dir=work_dir)
        seconds[f"step {index + 1} {step.name}"] = time.perf_counter() - start
        wait_for_everyone()  # no process still reads the step's files when the main one removes them
        if partial is not None and is_main_process():  # the last step too: the evaluation can be long
            save(current, partial / "checkpoint", overwrite=True)
            _write_state(partial, recipe, index + 1)
            if work_dir is not None and work_dir.exists():
                shutil.rmtree(work_dir)  # the step's result is in the checkpoint now
        wait_for_everyone()

    report = None
    if recipe.evaluation is not None:
        start = time.perf_counter()
        reference = load_model(recipe.model, device=device)
        report = evaluate(current, reference=reference, config=recipe.evaluation)
        del reference
        seconds["evaluate"] = time.perf_counter() - start
    get_record(current).metrics["recipe"] = recipe.to_dict()
    get_record(current).metrics["seconds"] = seconds
    if output is not None and is_main_process():
        start = time.perf_counter()
        save(current, output, overwrite=overwrite)
        seconds["save"] = time.perf_counter() - start
        if partial.exists():
            shutil.rmtree(partial)
    wait_for_everyone()
    return RecipeResult(current, output, report, seconds)
