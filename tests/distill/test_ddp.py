"""Data-parallel distillation: two CPU processes (torchrun, gloo) run the same trainer code as one GPU each would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")


def _torchrun(output: Path, mode: str, steps: int, port: int, fails: bool = False) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.fail("torchrun (installed with torch) not found")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(WORKER),
                             str(output), mode, str(steps)], env=env, capture_output=True, text=True, timeout=600)
    assert (result.returncode != 0) == fails, result.stderr[-3000:]


def _ranks(output: Path) -> list[dict]:
    return [json.loads((output / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_two_processes_train_in_step_and_resume(tmp_path):
    _torchrun(tmp_path / "straight", "start", 4, 29561)
    straight = _ranks(tmp_path / "straight")
    assert straight[0]["digest"] == straight[1]["digest"]  # DDP kept the replicas identical
    log = [json.loads(line) for line in (tmp_path / "straight" / "run" / "log.jsonl").read_text().splitlines()]
    assert len([entry for entry in log if entry["kind"] == "eval"]) == 3  # written once, by the main process
    # 4 sequences per step and process: 24 data tokens, or 8 prompt + 8 sampled tokens on on-policy steps
    per_step = [4 * (16 if entry["on_policy"] else 24) for entry in log if entry["kind"] == "train"]
    assert straight[0]["processes"] == 2 and straight[0]["tokens"] == 2 * sum(per_step)
    assert straight[0]["kl"][-1] < straight[0]["kl"][0]

    # both processes crash in step 3; resuming from the step-2 checkpoint ends with the same weights
    _torchrun(tmp_path / "resumed", "crash", 4, 29562, fails=True)
    assert (tmp_path / "resumed" / "run" / "checkpoints" / "step-00000002" / "random_states_1.pkl").is_file()
    _torchrun(tmp_path / "resumed", "resume", 4, 29563)
    assert _ranks(tmp_path / "resumed")[0]["digest"] == straight[0]["digest"]
