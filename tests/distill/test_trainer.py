"""The distillation trainer on tiny models: it learns, every loss and mode runs, it resumes exactly, it fails clearly."""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys

import pytest
import torch
from torch.torch_version import TorchVersion

import slmkit
from slmkit import DistillConfig
from slmkit.config import ConfigError
from slmkit.distill import losses, trainer
from slmkit.errors import SlmkitError
from tests.conftest import random_tokens, tiny_config, tiny_model

FAST = dict(steps=8, batch_size=4, micro_batch_size=2, learning_rate=3e-3, warmup_steps=1, eval_every=4,
            log_every=1, save_every=100)


def _pair(family: str = "llama"):
    """(student, teacher): the student is the teacher with its matrices damaged by noise, like a compressed
    model; the teacher's logits are sharpened ×4 so its distributions are far from uniform."""
    teacher = tiny_model(family, seed=0)
    student = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(4)
        for parameter in student.parameters():
            if parameter.dim() == 2:
                parameter.add_(0.5 * parameter.std() * torch.randn(parameter.shape, generator=generator))
    return student, teacher


def _data():
    return random_tokens(16, 24, seed=1), random_tokens(4, 24, seed=2)


def _distill(student, teacher, output_dir=None, **fields):
    data, eval_data = _data()
    return slmkit.distill(student, teacher, DistillConfig(**{**FAST, **fields}), data=data, eval_data=eval_data,
                          output_dir=output_dir)


def _kl_curve(student) -> list[float]:
    return [entry["kl"] for entry in student.slmkit.metrics["distill"]["evals"]]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_distillation_lowers_kl_and_records_the_run(family):
    student, teacher = _pair(family)
    before = copy.deepcopy(teacher.state_dict())
    _distill(student, teacher)
    curve = _kl_curve(student)
    assert len(curve) == 3 and curve[-1] < 0.92 * curve[0]
    summary = student.slmkit.metrics["distill"]
    assert summary["steps"] == 8 and summary["tokens"] == 8 * 4 * 24 and summary["tokens_per_s"] > 0
    assert student.slmkit.steps[-1]["distill"]["steps"] == 8
    for name, tensor in teacher.state_dict().items():  # the teacher is frozen
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("loss", losses.LOSSES)
@pytest.mark.parametrize("top_k", [None, 8])
def test_every_loss_lowers_kl(loss, top_k):
    student, teacher = _pair()
    _distill(student, teacher, loss=loss, top_k=top_k, temperature=2.0 if loss == "forward_kl" else 1.0)
    curve = _kl_curve(student)
    assert curve[-1] < 0.95 * curve[0]


def test_cross_entropy_mix_is_logged():
    student, teacher = _pair()
    run = _distill(student, teacher, ce_weight=0.3)
    assert run.slmkit.metrics["distill"]["evals"][-1]["kl"] < run.slmkit.metrics["distill"]["evals"][0]["kl"]


@pytest.mark.parametrize("mode", ["on_policy", "mixed"])
def test_on_policy_modes_train_on_student_samples(mode, tmp_path):
    student, teacher = _pair()
    _distill(student, teacher, mode=mode, on_policy_fraction=0.5, prompt_len=8, max_new_tokens=8, ce_weight=0.2,
             output_dir=tmp_path)
    entries = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    kinds = {entry["on_policy"] for entry in entries if entry["kind"] == "train"}
    assert kinds == ({True} if mode == "on_policy" else {True, False})
    on_policy_tokens = [entry for entry in entries if entry["kind"] == "train" and entry["on_policy"]]
    assert all("ce" not in entry for entry in on_policy_tokens)  # no CE on the student's own samples
    assert _kl_curve(student)[-1] < _kl_curve(student)[0]


def test_hidden_state_loss_with_a_narrower_student_learns_a_projection(tmp_path):
    import transformers

    config = tiny_config("llama")
    config.hidden_size, config.num_hidden_layers = 32, 1
    torch.manual_seed(3)
    student = transformers.AutoModelForCausalLM.from_config(config)
    teacher = tiny_model("llama")
    _distill(student, teacher, hidden_weight=1.0, output_dir=tmp_path)
    entries = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    hidden = [entry["hidden"] for entry in entries if entry["kind"] == "train"]
    assert hidden[-1] < hidden[0]
    saved = trainer.checkpoint_dirs(tmp_path)[-1] / "model.safetensors"
    from safetensors.torch import load_file

    assert load_file(saved)["projections.0.weight"].shape == (64, 32)  # student width 32 → teacher 64
    assert not hasattr(student, "projections")  # the returned student is the plain model


def test_pruned_weights_stay_zero():
    student, teacher = _pair()
    slmkit.prune(student, slmkit.MagnitudePruneConfig(sparsity=0.5))
    zeros = {name: p == 0 for name, p in student.named_parameters() if p.dim() == 2 and (p == 0).float().mean() > 0.4}
    assert zeros
    _distill(student, teacher)
    for name, parameter in student.named_parameters():
        if name in zeros:
            assert (parameter[zeros[name]] == 0).all(), name


def test_quantized_teacher(tmp_path):
    student, teacher = _pair()
    _distill(student, teacher, teacher_quantize={"smoothquant": {"alpha": 0.5}})
    assert any(type(m).__name__ == "W8A8Linear" for m in teacher.modules())
    assert _kl_curve(student)[-1] < _kl_curve(student)[0]


# --- resume ------------------------------------------------------------------------------------

RESUME = dict(steps=6, batch_size=4, micro_batch_size=2, eval_every=2, save_every=2, log_every=1,
              mode="mixed", prompt_len=8, max_new_tokens=8)  # mixed: the RNG of sampling is resumed too


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _log(path) -> list[dict]:
    entries = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
    for entry in entries:
        entry.pop("tokens_per_s", None)
    return entries


def _interrupt_at(monkeypatch, step: int, micro_batch: int, error: type[BaseException]):
    """Raise ``error`` inside optimizer step ``step`` (1-based), at its ``micro_batch``-th micro-batch."""
    original = trainer.DistillTrainer._micro_batch_loss
    calls: dict[int, int] = {}  # optimizer step → micro-batches started in it

    def failing(self, batch, on_policy):
        calls[self.step] = calls.get(self.step, 0) + 1
        if self.step == step - 1 and calls[self.step] == micro_batch:
            raise error()
        return original(self, batch, on_policy)

    monkeypatch.setattr(trainer.DistillTrainer, "_micro_batch_loss", failing)


@pytest.mark.parametrize("error, saved_steps", [(KeyboardInterrupt, 3), (RuntimeError, 2)])
def test_resume_continues_exactly_where_it_stopped(error, saved_steps, tmp_path, monkeypatch):
    data, eval_data = _data()
    config = DistillConfig(**RESUME)
    student, teacher = _pair()
    straight = slmkit.distill(copy.deepcopy(student), teacher, config, data, eval_data, tmp_path / "straight")

    # stopped in step 4's second micro-batch: Ctrl-C saves the last finished step (3); a crash leaves the
    # last periodic checkpoint (2)
    resumed, saved = _stop_and_resume(student, teacher, config, tmp_path / "run", monkeypatch, error)
    assert saved == f"step-{saved_steps:08d}"
    _assert_same_training(resumed, straight, tmp_path / "run", tmp_path / "straight")
    assert resumed.slmkit.metrics["distill"]["evals"] == straight.slmkit.metrics["distill"]["evals"]


def _stop_and_resume(student, teacher, config, output_dir, monkeypatch, error: type[BaseException]):
    """(student resumed to the end, name of the checkpoint it resumed from) of a run stopped by ``error`` in
    step 4's second micro-batch."""
    data, eval_data = _data()
    _interrupt_at(monkeypatch, step=4, micro_batch=2, error=error)
    with pytest.raises(error):
        slmkit.distill(copy.deepcopy(student), teacher, config, data, eval_data, output_dir)
    saved = trainer.checkpoint_dirs(output_dir)[-1].name
    monkeypatch.undo()
    return slmkit.distill(copy.deepcopy(student), teacher, config, data, eval_data, output_dir, resume=True), saved


def _assert_same_training(resumed, straight, resumed_dir, straight_dir) -> None:
    """The resumed run ended with the uninterrupted run's weights, bit for bit, and logged the same."""
    expected = _state(straight)
    for name, tensor in _state(resumed).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    assert _log(resumed_dir) == _log(straight_dir)


def test_resume_ignores_a_half_written_checkpoint_and_keeps_only_recent_ones(tmp_path, monkeypatch):
    data, eval_data = _data()
    config = DistillConfig(**{**RESUME, "keep_checkpoints": 2})
    student, teacher = _pair()
    _interrupt_at(monkeypatch, step=6, micro_batch=1, error=RuntimeError)
    with pytest.raises(RuntimeError):
        slmkit.distill(copy.deepcopy(student), teacher, config, data, eval_data, tmp_path)
    monkeypatch.undo()
    assert [d.name for d in trainer.checkpoint_dirs(tmp_path)] == ["step-00000002", "step-00000004"]
    # a save that died half-way: a temp dir without trainer_state.json, and a broken step dir
    latest = trainer.checkpoint_dirs(tmp_path)[-1]
    shutil.copytree(latest, tmp_path / "checkpoints" / ".tmp-step-00000006")
    (tmp_path / "checkpoints" / "step-00000006").mkdir()
    resumed = slmkit.distill(copy.deepcopy(student), teacher, config, data, eval_data, tmp_path, resume=True)
    assert resumed.slmkit.metrics["distill"]["steps"] == 6
    assert trainer.checkpoint_dirs(tmp_path)[-1].name == "step-00000006"


def test_resume_after_completion_returns_the_trained_student(tmp_path):
    data, eval_data = _data()
    config = DistillConfig(**RESUME)
    student, teacher = _pair()
    first = slmkit.distill(copy.deepcopy(student), teacher, config, data, eval_data, tmp_path)
    again = slmkit.distill(copy.deepcopy(student), teacher, config, data, eval_data, tmp_path, resume=True)
    expected = _state(first)
    for name, tensor in _state(again).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


def test_resume_refuses_a_different_run(tmp_path):
    data, eval_data = _data()
    student, teacher = _pair()
    slmkit.distill(copy.deepcopy(student), teacher, DistillConfig(**RESUME), data, eval_data, tmp_path)
    changed = DistillConfig(**{**RESUME, "learning_rate": 1e-3})
    with pytest.raises(SlmkitError, match="config.learning_rate"):
        slmkit.distill(copy.deepcopy(student), teacher, changed, data, eval_data, tmp_path, resume=True)
    with pytest.raises(SlmkitError, match="data changed"):
        slmkit.distill(copy.deepcopy(student), teacher, DistillConfig(**RESUME), data.flip(0), eval_data, tmp_path,
                       resume=True)


# --- errors ------------------------------------------------------------------------------------

def test_errors_before_training(tmp_path):
    student, teacher = _pair()
    data, eval_data = _data()
    config = DistillConfig(**FAST)
    with pytest.raises(SlmkitError, match="is the teacher object"):
        slmkit.distill(teacher, teacher, config, data, eval_data)
    with pytest.raises(SlmkitError, match=r"slmkit.distill \(teacher\): expected a model .*got NoneType"):
        slmkit.distill(student, None, config, data, eval_data)  # was an AttributeError deep in the checks
    with pytest.raises(SlmkitError, match=r"slmkit.distill \(student\): expected a model .*got str \(a source"):
        slmkit.distill("smollm2-135m", teacher, config, data, eval_data)
    with pytest.raises(SlmkitError, match="no such file or directory"):
        slmkit.distill(student, str(tmp_path / "no-teacher"), config, data, eval_data)
    with pytest.raises(SlmkitError, match="shares weight tensors"):
        shallow = copy.copy(teacher)
        slmkit.distill(shallow, teacher, config, data, eval_data)
    with pytest.raises(SlmkitError, match="vocabulary"):
        slmkit.distill(tiny_model("llama", vocab_size=300), teacher, config, data, eval_data)
    with pytest.raises(SlmkitError, match="data is empty"):
        slmkit.distill(student, teacher, config, data[:0], eval_data)
    with pytest.raises(SlmkitError, match="above the model's maximum of 256"):
        slmkit.distill(student, teacher, config, random_tokens(4, 300), eval_data)
    with pytest.raises(SlmkitError, match="too little training data"):
        slmkit.distill(student, teacher, config, data[:1], eval_data)
    with pytest.raises(SlmkitError, match="does not exist"):
        slmkit.distill(student, teacher, config, data, eval_data, tmp_path / "missing", resume=True)
    with pytest.raises(SlmkitError, match="no complete checkpoint"):
        slmkit.distill(student, teacher, config, data, eval_data, tmp_path, resume=True)
    with pytest.raises(SlmkitError, match="prompt_len"):
        slmkit.distill(student, teacher, DistillConfig(**{**FAST, "mode": "on_policy", "prompt_len": 30}), data,
                       eval_data)
    with pytest.raises(SlmkitError, match="out of range"):
        slmkit.distill(student, teacher, DistillConfig(**{**FAST, "hidden_weight": 1.0, "hidden_layers": [[0, 5]]}),
                       data, eval_data)


@pytest.mark.parametrize("kind, fsdp2, student, fields, message", [
    ("DEEPSPEED", False, None, {}, "does not support DEEPSPEED; launch with DDP or FSDP2"),
    ("FSDP", False, None, {}, "FSDP2 only; set fsdp_version: 2"),
    ("FSDP", True, "shared", {}, "share FFN weights cannot be sharded"),
    ("FSDP", True, None, {"optimizer": "adamw_8bit"}, "adamw_8bit.*use optimizer: adamw"),
], ids=["deepspeed", "fsdp1", "shared-ffn", "adamw-8bit"])
def test_launch_configurations_the_trainer_cannot_run_are_refused(kind, fsdp2, student, fields, message):
    from types import SimpleNamespace

    accelerator = SimpleNamespace(distributed_type=SimpleNamespace(name=kind), is_fsdp2=fsdp2)
    model = SimpleNamespace(config=SimpleNamespace(ffn_groups=[0, 0])) if student == "shared" else tiny_model("llama")
    with pytest.raises(SlmkitError, match=message):
        trainer._check_distributed(accelerator, model, DistillConfig(**{**FAST, **fields}))
    trainer._check_distributed(SimpleNamespace(distributed_type=SimpleNamespace(name="MULTI_GPU"), is_fsdp2=False),
                               model, DistillConfig(**{**FAST, **fields}))  # data parallelism takes any of them


@pytest.mark.parametrize("device, version, refused", [
    ("cpu", "2.6.0+cu124", True), ("cpu", "2.7.1", False), ("cpu", "2.13.0+cpu", False), ("cuda", "2.6.0", False),
])
def test_fsdp_on_cpu_processes_needs_a_torch_that_runs_it(device, version, refused):
    from types import SimpleNamespace

    accelerator = SimpleNamespace(distributed_type=SimpleNamespace(name="FSDP"), is_fsdp2=True,
                                  device=torch.device(device))
    check = lambda: trainer._check_distributed(accelerator, tiny_model("llama"), DistillConfig(**FAST),  # noqa: E731
                                               torch_version=version)
    if refused:
        message = r"FSDP across CPU processes needs torch >= 2\.7 \(this is " + re.escape(version) + r"\)"
        with pytest.raises(SlmkitError, match=message):
            check()
    else:
        check()


def test_existing_run_is_not_overwritten(tmp_path):
    student, teacher = _pair()
    data, eval_data = _data()
    slmkit.distill(copy.deepcopy(student), teacher, DistillConfig(**FAST), data, eval_data, tmp_path)
    with pytest.raises(SlmkitError, match="pass resume=True"):
        slmkit.distill(copy.deepcopy(student), teacher, DistillConfig(**FAST), data, eval_data, tmp_path)


def test_quantized_student_is_refused():
    student, teacher = _pair()
    slmkit.quantize(student, slmkit.SmoothQuantConfig(alpha=0.5), calib=random_tokens(4, 16))
    data, eval_data = _data()
    with pytest.raises(SlmkitError, match="distill before quantizing"):
        slmkit.distill(student, teacher, DistillConfig(**FAST), data, eval_data)


def test_8bit_adamw_needs_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: importing it fails
    student, teacher = _pair()
    data, eval_data = _data()
    with pytest.raises(SlmkitError, match="pip install 'slmkit\\[bnb\\]'"):
        slmkit.distill(student, teacher, DistillConfig(**FAST, optimizer="adamw_8bit"), data, eval_data)


@pytest.mark.parametrize("device, version, refused", [
    ("cpu", "0.49.2", True), ("cpu", "0.50.0", False), ("cpu", "0.50.2", False), ("cuda", "0.46.0", False)])
def test_8bit_adamw_on_the_cpu_needs_a_bitsandbytes_that_steps_there(device, version, refused):
    if refused:
        with pytest.raises(SlmkitError, match=f"needs bitsandbytes >= 0.50 \\(this is {version}\\)"):
            trainer.check_bitsandbytes(device, version)
    else:
        trainer.check_bitsandbytes(device, version)


def _first_moment_dtypes(state) -> set[torch.dtype]:
    """The dtypes of the first moments (``state1``) anywhere in an optimizer state (bitsandbytes nests its
    quantized ones under a key of its own)."""
    if isinstance(state, dict):
        found = {state["state1"].dtype} if isinstance(state.get("state1"), torch.Tensor) else set()
        return found.union(*(_first_moment_dtypes(value) for value in state.values()))
    if isinstance(state, (list, tuple)):
        return set().union(*(_first_moment_dtypes(value) for value in state))
    return set()


def test_8bit_adamw_trains_and_resumes_exactly(tmp_path, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes", reason="the 8-bit optimizer is optional (pip install 'slmkit[bnb]')")
    if TorchVersion(bnb.__version__) < trainer.BNB_CPU_MIN:
        pytest.skip(f"bitsandbytes {bnb.__version__} has no CPU 8-bit AdamW")
    data, eval_data = _data()
    config = DistillConfig(**{**RESUME, "optimizer": "adamw_8bit", "learning_rate": 3e-3})
    student, teacher = _pair()
    straight = slmkit.distill(copy.deepcopy(student), teacher, config, data, eval_data, tmp_path / "straight")
    curve = _kl_curve(straight)
    assert curve[-1] < 0.95 * curve[0]
    # the moments of the matrices are stored in 8 bits (bitsandbytes keeps tensors under 4,096 values in 32)
    state = torch.load(trainer.checkpoint_dirs(tmp_path / "straight")[-1] / "optimizer.bin", weights_only=False)
    assert _first_moment_dtypes(state["state"]) == {torch.uint8, torch.float32}

    resumed, _ = _stop_and_resume(student, teacher, config, tmp_path / "run", monkeypatch, RuntimeError)
    _assert_same_training(resumed, straight, tmp_path / "run", tmp_path / "straight")


@pytest.mark.parametrize("fields, message", [
    ({"loss": "kl"}, "loss must be one of"),
    ({"batch_size": 6, "micro_batch_size": 4}, "multiple of micro_batch_size"),
    ({"mode": "mixed", "on_policy_fraction": 1.0}, "on_policy_fraction"),
    ({"teacher_quantize": {"wanda": {}}}, "must be a quantization step"),
    ({"teacher_quantize": {"nope": {}}}, "unknown step"),
    ({"data": {"num_blocks": 0}}, "num_blocks"),
    ({"hidden_layers": [[0]]}, "hidden_layers"),
    ({"top_k": 0}, "top_k"),
])
def test_config_validation(fields, message):
    with pytest.raises(ConfigError, match=message):
        DistillConfig.from_dict(fields)


def test_config_round_trips_through_a_recipe_dict():
    config = DistillConfig.from_dict({"steps": 10, "data": {"num_blocks": 8, "block_len": 64}, "eval": {"max_tokens": 512, "seq_len": 128}})
    again = DistillConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.data.block_len == 64 and again.eval.seq_len == 128


def test_gradient_checkpointing_gives_the_same_training():
    student, teacher = _pair()
    plain = _distill(copy.deepcopy(student), teacher)
    checkpointed = _distill(copy.deepcopy(student), teacher, gradient_checkpointing=True)
    flag = "is_activation_checkpointing" if hasattr(checkpointed, "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert not getattr(checkpointed, flag)  # switched off again after training
    expected = _state(plain)
    for name, tensor in _state(checkpointed).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_trains():
    # bf16 autocast is what GPUs use; accelerate runs it on CPUs too, so the mixed-precision path is tested here
    student, teacher = _pair()
    _distill(student, teacher, mixed_precision="bf16")
    assert student.slmkit.metrics["distill"]["mixed_precision"] == "bf16"
    assert next(student.parameters()).dtype == torch.float32  # master weights stay float32
    assert _kl_curve(student)[-1] < _kl_curve(student)[0]


def test_tensorboard_logs_when_installed(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is optional (pip install 'slmkit[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    student, teacher = _pair()
    _distill(student, teacher, output_dir=tmp_path)
    events = EventAccumulator(str(next((tmp_path / "distill").glob("events.out.tfevents.*"))))
    events.Reload()
    kl = [(event.step, event.value) for event in events.Scalars("eval/kl")]
    assert [step for step, _ in kl] == [0, 4, 8]
    assert kl[-1][1] == pytest.approx(_kl_curve(student)[-1], rel=1e-5)


def test_a_copy_of_a_frozen_teacher_trains():
    student, teacher = _pair()
    student.requires_grad_(False)  # e.g. deep-copied from the teacher of an earlier run
    before = student.lm_head.weight.detach().clone()
    _distill(student, teacher, steps=2, eval_every=0)
    assert not torch.equal(student.lm_head.weight, before)


def test_the_teacher_may_be_a_model_source(tmp_path):
    student, teacher = _pair()
    twin = copy.deepcopy(student)
    teacher.save_pretrained(tmp_path / "teacher")
    from_source = _distill(student, str(tmp_path / "teacher"))
    from_object = _distill(twin, teacher)
    assert from_source.slmkit.metrics["distill"]["evals"][-1]["kl"] == pytest.approx(
        from_object.slmkit.metrics["distill"]["evals"][-1]["kl"], rel=1e-5)
