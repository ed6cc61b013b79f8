"""scripts/test_versions.sh, the suite against other dependency versions: its argument handling (the
installs and the run itself are what the README's Requirements table records)."""

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "test_versions.sh"


def _run(*args):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_help_shows_examples():
    result = _run("--help")
    assert result.returncode == 0
    assert "bash scripts/test_versions.sh --python python3.12 torch==2.11.0" in result.stdout


@pytest.mark.parametrize("args, message", [
    ((), "name the versions to test"),
    (("--bogus", "torch==2.6.0"), "unknown option '--bogus'"),
    (("--python", "no-such-python3", "torch==2.6.0"), "no Python interpreter 'no-such-python3'"),
    (("--venv",), "--venv needs a directory"),
])
def test_bad_arguments_fail_in_one_line_before_any_install(args, message):
    result = _run(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_an_existing_path_that_is_not_a_venv_is_left_alone(tmp_path):
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "a.txt").write_text("mine")
    result = _run("--venv", str(keep), "torch==2.6.0")
    assert result.returncode == 2
    assert "is not a venv" in result.stderr
    assert [p.name for p in keep.iterdir()] == ["a.txt"]
