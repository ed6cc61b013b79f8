"""Data-parallel and sharded (FSDP2) distillation: two CPU processes (torchrun, gloo) run the same trainer code as
one GPU each would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.torch_version import TorchVersion

from slmkit.distill.trainer import FSDP_CPU_MIN_TORCH
from tests.conftest import torchrun

WORKER = Path(__file__).with_name("ddp_worker.py")


def _torchrun(output: Path, mode: str, steps: int, port: int, fails: bool = False, parallel: str = "ddp") -> None:
    torchrun(WORKER, [output, mode, steps, parallel], port, fails)


def _ranks(output: Path) -> list[dict]:
    return [json.loads((output / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 4-step data-parallel run."""
    output = tmp_path_factory.mktemp("ddp") / "straight"
    _torchrun(output, "start", 4, 29561)
    return output


def test_two_processes_train_in_step_and_resume(straight, tmp_path):
    ranks = _ranks(straight)
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept the replicas identical
    log = [json.loads(line) for line in (straight / "run" / "log.jsonl").read_text().splitlines()]
    assert len([entry for entry in log if entry["kind"] == "eval"]) == 3  # written once, by the main process
    # 4 sequences per step and process: 24 data tokens, or 8 prompt + 8 sampled tokens on on-policy steps
    per_step = [4 * (16 if entry["on_policy"] else 24) for entry in log if entry["kind"] == "train"]
    assert ranks[0]["processes"] == 2 and ranks[0]["tokens"] == 2 * sum(per_step)
    assert ranks[0]["kl"][-1] < ranks[0]["kl"][0]
    assert ranks[0]["zeros"] and ranks[0]["zeros_kept"]
    # the main process's experiment tracker got the logs and was finished; every process kept the group
    assert ranks[0]["logged"] >= 5 and ranks[0]["tracker_finished"] and ranks[1]["logged"] == 0
    assert all(r["group_alive"] for r in ranks)

    # both processes crash in step 3; resuming from the step-2 checkpoint ends with the same weights
    _torchrun(tmp_path / "resumed", "crash", 4, 29562, fails=True)
    assert (tmp_path / "resumed" / "run" / "checkpoints" / "step-00000002" / "random_states_1.pkl").is_file()
    _torchrun(tmp_path / "resumed", "resume", 4, 29563)
    assert _ranks(tmp_path / "resumed")[0]["digest"] == ranks[0]["digest"]


@pytest.mark.skipif(TorchVersion(torch.__version__) < FSDP_CPU_MIN_TORCH,
                    reason=f"FSDP across CPU processes needs torch >= {FSDP_CPU_MIN_TORCH} (refused: test_trainer.py)")
def test_fsdp_shards_the_student_resumes_and_hands_back_whole_weights(straight, tmp_path):
    _torchrun(tmp_path / "fsdp", "start", 4, 29564, parallel="fsdp")
    ranks = _ranks(tmp_path / "fsdp")
    assert [r["distributed"] for r in ranks] == ["FSDP", "FSDP"]
    assert ranks[0]["plain"] and ranks[0]["zeros"] and ranks[0]["zeros_kept"] and ranks[0]["changed"]
    assert ranks[0]["tracker_finished"] and all(r["group_alive"] for r in ranks)  # the final gather needs it
    # every process holds the whole trained student, the same weights data parallelism trains (bit for bit
    # from torch 2.9; 2.7 and 2.8, which slmkit also runs FSDP on, round the sharded reduction differently)
    assert ranks[0]["digest"] == ranks[1]["digest"]
    if TorchVersion(torch.__version__) >= "2.9":
        assert ranks[0]["digest"] == _ranks(straight)[0]["digest"]
    step = tmp_path / "fsdp" / "run" / "checkpoints" / "step-00000004"
    assert (step / "pytorch_model_fsdp_0").is_dir() and (step / "optimizer_0").is_dir()  # sharded checkpoints

    _torchrun(tmp_path / "resumed", "crash", 4, 29565, fails=True, parallel="fsdp")
    _torchrun(tmp_path / "resumed", "resume", 4, 29566, parallel="fsdp")
    assert _ranks(tmp_path / "resumed")[0]["digest"] == ranks[0]["digest"]


@pytest.mark.gpu
def test_fsdp_on_one_gpu_through_accelerate_launch_and_the_shipped_config(tmp_path):
    """accelerate's own FSDP2 path (not forced), bf16, on the GPU, launched with recipes/accelerate/fsdp.yaml."""
    import os
    import shutil
    import subprocess
    import sys

    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    config = Path(__file__).parents[2] / "recipes" / "accelerate" / "fsdp.yaml"
    result = subprocess.run([launcher, "launch", "--config_file", str(config), "--num_processes", "1",
                             "--main_process_port", "29567", str(WORKER), str(tmp_path), "start", "4", "launched"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (rank,) = [json.loads((tmp_path / "rank0.json").read_text())]
    assert rank["distributed"] == "FSDP" and rank["device"].startswith("cuda")
    assert rank["plain"] and rank["zeros"] and rank["zeros_kept"] and rank["changed"]  # trained, whole, on CUDA
