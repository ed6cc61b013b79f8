"""Run by test_ddp.py under ``torchrun --nproc_per_node 2``: one tiny distillation, results to a JSON file."""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2]))

import slmkit  # noqa: E402
from accelerate import PartialState  # noqa: E402
from slmkit import DistillConfig  # noqa: E402
from tests.distill.test_trainer import RESUME, _data, _pair  # noqa: E402

output, mode, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
resume = mode == "resume"
state = PartialState()
if mode == "crash":  # every process fails in step 3, after the step-2 checkpoint
    from slmkit.distill import trainer

    original = trainer.DistillTrainer._micro_batch_loss

    def crashing(self, batch, on_policy):
        if self.step == 2:
            raise RuntimeError("simulated crash")
        return original(self, batch, on_policy)

    trainer.DistillTrainer._micro_batch_loss = crashing
student, teacher = _pair()
data, eval_data = _data()
config = DistillConfig(**{**RESUME, "steps": steps})
slmkit.distill(student, teacher, config, data, eval_data, output_dir=output / "run", resume=resume, device="cpu")
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in student.parameters())).hexdigest()
summary = student.slmkit.metrics["distill"]
(output / f"rank{state.process_index}.json").write_text(json.dumps(
    {"digest": digest, "processes": summary["processes"], "tokens": summary["tokens"],
     "kl": [e["kl"] for e in summary["evals"]]}))
