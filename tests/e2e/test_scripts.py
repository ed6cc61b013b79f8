"""The benchmark scripts on the real SmolLM2 (cheap settings): a comparison written after every
row, ``--resume`` measuring only the rows it lacks, each row's run record, refusals that name the setting."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"slmkit_test_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_transforms_resumes_and_records_which_run_measured_each_row(tmp_path, capsys):
    script = _script("compare_transforms")
    cheap = ["--distill-steps", "0", "--max-tokens", "1024", "--calib-blocks", "1", "--out", str(tmp_path)]
    result, markdown = tmp_path / "smollm2-transforms-comparison.json", tmp_path / "smollm2-transforms-comparison.md"
    assert script.main(["--only", "uniform", *cheap]) == 0  # --distill-steps 0: no distillation (it used to fail)
    first = json.loads(result.read_text())
    assert [row["key"] for row in first["rows"]] == ["uniform"] and first["distill"] is None
    assert "after_distill" not in first["rows"][0] and "openelm" in first["not_measured"]
    assert set(first["rows"][0]["measured"]) == {"date", "command", "device", "versions"}

    assert script.main(["--resume", "--only", "openelm-ffn,uniform", *cheap]) == 0
    second = json.loads(result.read_text())
    assert [row["key"] for row in second["rows"]] == ["uniform", "openelm-ffn"]  # the table's order
    assert second["rows"][0] == first["rows"][0]  # kept as measured, with its own run record
    assert second["updated_rows"] == ["openelm-ffn"]
    assert "The rows come from 2 runs" in markdown.read_text()

    before = (result.read_text(), markdown.read_text())
    capsys.readouterr()
    assert script.main(["--resume", "--only", "uniform", *cheap]) == 0
    assert "nothing to measure" in capsys.readouterr().out
    assert (result.read_text(), markdown.read_text()) == before  # a finished result is left alone

    other = [*cheap[:2], "--max-tokens", "2048", *cheap[4:]]
    assert script.main(["--resume", "--only", "openelm", *other]) == 2
    assert "was measured with --max-tokens 1024, this run has 2048; pass --max-tokens 1024" in capsys.readouterr().err
    assert (result.read_text(), markdown.read_text()) == before


@pytest.mark.parametrize("name, args, message", [
    ("bench_distill", ["--seq-len", "99999"], "--seq-len 99999 is above the model's context (8192 tokens)"),
    ("bench_load", ["--repeats", "0"], "--repeats must be positive, got 0"),
    ("bench_speculative", ["--prompts", "0"], "--prompts must be in 1..4"),
    ("bench_speculative", ["--draft-tokens", "-1"], "speculative_tokens must be in 0..64"),
    ("bench_speculative", ["--max-tokens", "9000"], "max_model_len 9512 exceeds what the model supports (8192"),
    ("compare_transforms", ["--distill-steps", "-1"], "steps must be in [1, "),
    ("compare_transforms", ["--budget", "2"], "--budget is the fraction of the parameters kept, in (0, 1); got 2"),
    ("bench_matmul", ["--shapes", "llama9"], "unknown shape set 'llama9'"),  # said first, GPU or not
])
def test_scripts_refuse_bad_settings_in_one_line(name, args, message, tmp_path, capsys):
    assert _script(name).main([*args, "--out", str(tmp_path / "out")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "out").exists()  # nothing written
