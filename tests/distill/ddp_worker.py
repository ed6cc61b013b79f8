"""Run by test_ddp.py under ``torchrun --nproc_per_node 2``: one tiny distillation, results to a JSON file.

Arguments: output directory, mode ("start", "crash": every process fails in step 3, "resume"), steps, and
the parallelism: "ddp" or "fsdp" (FSDP2) on CPU processes, or "launched": on CUDA, as ``accelerate launch``
configured it (e.g. with recipes/accelerate/fsdp.yaml). The student is pruned to 50%, so its sparsity masks
are kept (and, under FSDP, sharded) too. The run logs to an experiment tracker (as TensorBoard would), which
must be finished without taking the process group down; the worker destroys it at the end, as a script should.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2]))

import torch  # noqa: E402

import slmkit  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.tracking import GeneralTracker  # noqa: E402
from slmkit import DistillConfig  # noqa: E402
from slmkit.distill import trainer  # noqa: E402
from tests.distill.test_trainer import RESUME, _data, _pair  # noqa: E402

output, mode, steps, parallel = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
resume = mode == "resume"
device = "cuda" if parallel == "launched" else "cpu"
state = PartialState(cpu=device == "cpu")
if mode == "crash":  # every process fails in step 3, after the step-2 checkpoint
    original = trainer.DistillTrainer._micro_batch_loss

    def crashing(self, batch, on_policy):
        if self.step == 2:
            raise RuntimeError("simulated crash")
        return original(self, batch, on_policy)

    trainer.DistillTrainer._micro_batch_loss = crashing
if parallel == "fsdp":
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    new_accelerator = trainer._new_accelerator

    def fsdp_accelerator(config, device, output_dir):
        # accelerate turns FSDP on for GPUs only; here its FSDP2 path is forced on two CPU processes (gloo),
        # so the trainer's sharded path (sharding, sharded masks and checkpoints, the final gather) runs in CI
        accelerator = new_accelerator(config, device, output_dir)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="SHARDED_STATE_DICT")
        return accelerator

    trainer._new_accelerator = fsdp_accelerator


class RecordingTracker(GeneralTracker):
    """An experiment tracker that counts what the trainer sends it."""

    name, requires_logging_directory = "recording", False

    def __init__(self):
        super().__init__()
        self.logged, self.finished = 0, False

    @property
    def tracker(self):
        return self

    def log(self, values, step=None, **kwargs):
        self.logged += 1

    def finish(self):
        self.finished = True


recording = RecordingTracker()
trainer._trackers = lambda output_dir: [recording]
student, teacher = _pair()
slmkit.prune(student, slmkit.MagnitudePruneConfig(sparsity=0.5))
zeros = {name: p == 0 for name, p in student.named_parameters() if p.dim() == 2 and (p == 0).float().mean() > 0.4}
before = [p.detach().clone() for p in student.parameters()]
data, eval_data = _data()
config = DistillConfig(**{**RESUME, "steps": steps})
slmkit.distill(student, teacher, config, data, eval_data, output_dir=output / "run", resume=resume, device=device)
parameters = dict(student.named_parameters())
digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in parameters.values())).hexdigest()
summary = student.slmkit.metrics["distill"]
(output / f"rank{state.process_index}.json").write_text(json.dumps(
    {"digest": digest, "processes": summary["processes"], "tokens": summary["tokens"],
     "distributed": summary["distributed"], "kl": [e["kl"] for e in summary["evals"]], "device": str(next(student.parameters()).device),
     "plain": all(type(p) is torch.nn.Parameter for p in parameters.values()),  # not sharded DTensors
     "changed": any(not torch.equal(a, b.to(a.device)) for a, b in zip(before, parameters.values())),
     "zeros": len(zeros), "zeros_kept": all(bool((parameters[n][z] == 0).all()) for n, z in zeros.items()),
     "logged": recording.logged, "tracker_finished": recording.finished,
     "group_alive": torch.distributed.is_initialized()}))
state.wait_for_everyone()  # the trainer left the process group up for the caller's further work
state.destroy_process_group()
# Leave without the interpreter's teardown. Under FSDP2 something in C++ still holds the gloo process group
# after destroy_process_group(), so its worker threads outlive the script; one that releases a finished
# collective's tensors while the interpreter finalizes cannot take the GIL and aborts the process (-6) after
# all the work is done (a known PyTorch race, pytorch/pytorch#190489; here 1 run in 12 to 50 on a busy CPU).
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
