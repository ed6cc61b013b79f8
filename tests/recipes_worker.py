"""Run by test_recipes.py under ``torchrun --nproc_per_node 2``: a recipe file on a tiny model, as
``accelerate launch -m slmkit.cli run`` would run it; each process writes what it saw to rank<i>.json.

Arguments: output root, recipe file, mode ("crash": every process fails inside the walk's block 1, after
block 0 is saved; "resume": run again)."""

import hashlib
import json
import sys
from pathlib import Path

# The repository root replaces this script's directory (tests/), whose kernels/ test package would shadow
# the Hugging Face kernels package that transformers imports.
sys.path[0] = str(Path(__file__).parents[1])

from accelerate import PartialState  # noqa: E402

from slmkit import calib as calibration  # noqa: E402
from slmkit.recipes import Recipe, run_recipe  # noqa: E402

root, recipe_file, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
state = PartialState(cpu=True)
writes, walked = [], []
for name in ("save_tensors_atomic", "write_text_atomic"):  # what this process writes in the walk's directory
    original = getattr(calibration, name)
    setattr(calibration, name, lambda path, *args, _write=original, **kwargs: writes.append(Path(path).name)
            or _write(path, *args, **kwargs))
observe = calibration.observe_inputs


def report(**more):
    (root / f"rank{state.process_index}.json").write_text(
        json.dumps({"rank": state.process_index, "writes": writes, "walked": walked, **more}))


def observe_and_crash(layer, modules, reduce, **kwargs):
    walked.append(layer.index)
    if mode == "crash" and layer.index == 1:
        report()
        state.wait_for_everyone()  # both have reported before either fails (torchrun then stops the other)
        raise RuntimeError("simulated crash in block 1")
    return observe(layer, modules, reduce, **kwargs)


calibration.observe_inputs = observe_and_crash
calibration.WalkCheckpoint._frontier_due = lambda self: True  # keep the hidden states after every block
recipe = Recipe.from_file(recipe_file)
result = run_recipe(recipe, output=root / "out", device="cpu")
report(digest=hashlib.sha256(b"".join(t.numpy().tobytes() for t in result.model.state_dict().values())).hexdigest())
state.destroy_process_group()  # as a script under torchrun should: its gloo threads stop before the interpreter's teardown
