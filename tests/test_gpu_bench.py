"""scripts/gpu_bench.sh, the GPU-box runner: its plumbing is checked here on the CPU."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_bench.sh"


def _run(*args, out=None):
    env = dict(os.environ, PY=sys.executable)
    if out:
        env.update(OUT=str(out / "out"), RESULTS=str(out / "results"))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_lists_every_step_with_its_limit():
    result = _run("--list")
    assert result.returncode == 0
    steps = [line.split()[0] for line in result.stdout.splitlines()]
    assert steps == ["env", "install", "tests", "matmul", "kernels", "generate", "sparse"]


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
