"""The distillation trainer, on accelerate (one CPU, one GPU, or many through ``accelerate launch``).

One optimizer step = ``accumulation_steps`` micro-batches; each micro-batch runs the frozen teacher
(no grad), then the student, and backpropagates the combined loss of :class:`DistillConfig`.

Output directory layout (all optional; without one nothing is written and nothing can resume)::

    OUT/log.jsonl                   one JSON object per log line: {"kind": "train"|"eval", "step", ...}
    OUT/checkpoints/step-00000050/  accelerate state (student + projections, optimizer, scheduler, RNG)
                                    plus trainer_state.json (step, tokens, data fingerprint)

Checkpoints are written to ``checkpoints/.tmp-step-N`` and renamed when complete, so a crash or Ctrl-C
during a save leaves the previous checkpoint intact. Ctrl-C (single process) saves the last finished
step before stopping. ``resume=True`` restores weights, optimizer, scheduler, RNG states and the data
position, and continues as if never stopped: the resumed run's weights equal an uninterrupted run's.

Launched with FSDP (``accelerate launch --config_file recipes/accelerate/fsdp.yaml``, FSDP2), each process
holds a shard of a copy of the student's weights and of its optimizer state, and checkpoints are sharded
(one file set per process); at the end every process copies the full trained weights into the caller's
student, which waits on the CPU meanwhile. The teacher is not sharded (one whole copy per device).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.torch_version import TorchVersion
from tqdm.auto import tqdm

from slmkit._processes import process_state
from slmkit.distill import losses
from slmkit.distill.config import DistillConfig
from slmkit.errors import SlmkitError
from slmkit.eval import metrics
from slmkit.eval.evaluate import score_windows
from slmkit.models.arch import blocks

CHECKPOINTS = "checkpoints"
LOG_FILE = "log.jsonl"
STATE_FILE = "trainer_state.json"
SPARSE_THRESHOLD = 0.1  # a weight with at least this fraction of exact zeros counts as pruned


class DistillModule(nn.Module):
    """The student plus the learned projections of the hidden-state loss, trained (and checkpointed) as one.

    ``layer_pairs`` lists (student block, teacher block); block i's output is ``hidden_states[i + 1]``.
    A projection student width → teacher width exists only when the widths differ.
    """

    def __init__(self, student: nn.Module, layer_pairs: list[tuple[int, int]], teacher_width: int):
        super().__init__()
        self.student = student
        # FSDP's transformer auto-wrap shards each block on its own: it reads the block classes here
        self._no_split_modules = getattr(student, "_no_split_modules", None)
        self.layer_pairs = layer_pairs
        width = student.config.hidden_size
        project = bool(layer_pairs) and width != teacher_width
        weight = next(student.parameters())
        self.projections = nn.ModuleList(
            nn.Linear(width, teacher_width, bias=False, device=weight.device, dtype=weight.dtype)
            for _ in (layer_pairs if project else [])
        )

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Student logits (B, T, V) and its mapped hidden states, projected to the teacher's width."""
        output = self.student(input_ids=input_ids, use_cache=False, output_hidden_states=bool(self.layer_pairs))
        hidden = [output.hidden_states[s + 1] for s, _ in self.layer_pairs]
        if len(self.projections):
            hidden = [projection(h) for projection, h in zip(self.projections, hidden)]
        return output.logits, hidden


def check_pair(student: nn.Module, teacher: nn.Module) -> None:
    """Fail before training when student and teacher cannot be distilled (same object, other vocabulary...)."""
    from slmkit.models.record import get_record, require_model

    require_model(student, "slmkit.distill (student)")
    require_model(teacher, "slmkit.distill (teacher)")
    if student is teacher:
        raise SlmkitError("the student is the teacher object; distill into a copy (e.g. a pruned model, "
                          "or copy.deepcopy(teacher))")
    teacher_tensors = {p.data_ptr() for p in teacher.parameters()}
    if any(p.data_ptr() in teacher_tensors for p in student.parameters()):
        raise SlmkitError("the student shares weight tensors with the teacher; distill into a copy "
                          "(copy.deepcopy(teacher))")
    student_vocab = student.get_output_embeddings().weight.shape[0]
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    if student_vocab != teacher_vocab:
        raise SlmkitError(f"the student's vocabulary ({student_vocab} tokens) differs from the teacher's "
                          f"({teacher_vocab}); distillation compares next-token distributions and needs the "
                          "same tokenizer")
    student_tokenizer, teacher_tokenizer = get_record(student).tokenizer, get_record(teacher).tokenizer
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise SlmkitError("the student's tokenizer differs from the teacher's (same size, other tokens); "
                              "distillation needs the same tokenizer")
    quantized = list(get_record(student).modules)  # paths of replaced (quantized) modules
    if quantized or not any(p.is_floating_point() for p in student.parameters()):
        where = f" ({quantized[0]}, ...)" if quantized else ""
        raise SlmkitError(f"the student has quantized layers{where} that cannot train; distill before "
                          "quantizing (prune → distill → quantize)")


def layer_pairs(student: nn.Module, teacher: nn.Module, config: DistillConfig) -> list[tuple[int, int]]:
    """The (student block, teacher block) pairs of the hidden-state loss ([] when it is off)."""
    if config.hidden_weight == 0:
        return []
    student_layers, teacher_layers = len(blocks(student)), len(blocks(teacher))
    if config.hidden_layers is None:
        return losses.uniform_layer_pairs(student_layers, teacher_layers)
    for s, t in config.hidden_layers:
        if s >= student_layers or t >= teacher_layers:
            raise SlmkitError(f"hidden_layers pair [{s}, {t}] is out of range: the student has {student_layers} "
                              f"blocks and the teacher {teacher_layers} (0-based)")
    return [(s, t) for s, t in config.hidden_layers]


def pruned_weights(model: nn.Module) -> set[str]:
    """Names of the 2-D float weights that pruning left with ≥ 10 % exact zeros (kept zero in training)."""
    return {name for name, parameter in model.named_parameters()
            if parameter.dim() == 2 and parameter.is_floating_point()
            and (parameter.detach() == 0).float().mean().item() >= SPARSE_THRESHOLD}


def sparsity_masks(model: nn.Module, names: set[str]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(weight, mask) pairs (mask True = keep) of the parameters ``names`` of ``model``, as they are now
    (after ``accelerator.prepare``: under FSDP each mask is sharded like its weight)."""
    return [(parameter, parameter.detach() != 0) for name, parameter in model.named_parameters() if name in names]


def _set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute block activations in the backward pass (transformers ≥ 5.2x names it activation
    checkpointing; older 5.x releases, like the GPU image's 5.17, only have the gradient_checkpointing names)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _rng_states() -> dict[str, Any]:
    """Every random generator training may draw from (sampling, dropout), to rewind an unfinished step."""
    import numpy

    states = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    import numpy

    random.setstate(states["python"])
    numpy.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def _tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints (those holding trainer_state.json), oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [d for d in root.glob("step-*") if (d / STATE_FILE).is_file()]
    return sorted(done, key=lambda d: int(d.name.split("-")[1]))


def _trackers(output_dir: Path | None):
    """The experiment trackers accelerate logs to, besides the JSONL log: TensorBoard (in the output
    directory) when it is installed."""
    from accelerate.utils import is_tensorboard_available

    return "tensorboard" if output_dir is not None and is_tensorboard_available() else None


def _new_accelerator(config: DistillConfig, device: str | None, output_dir: Path | None):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration

    use_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if not use_cpu and torch.cuda.is_bf16_supported() else "no"
    if process_state(cpu=use_cpu).num_processes == 1:
        # One process may run several trainings with different settings (a notebook, a test session);
        # accelerate keeps its settings process-wide, so start each training from a clean state.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(
        cpu=use_cpu,
        mixed_precision=precision,
        log_with=_trackers(output_dir),
        project_dir=str(output_dir) if output_dir is not None else None,
        # the sampler's order depends only on (seed, epoch), so a resumed run sees the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


# bitsandbytes' 8-bit AdamW steps on the CPU from 0.50: 0.46 to 0.49 stop in the first step ("All input tensors
# need to be on the same GPU"), and 0.45 does not import with a current Triton (no triton.ops). Measured on
# 0.45.0, 0.46.0, 0.47.0, 0.48.0, 0.48.2, 0.49.0, 0.50.0 and 0.50.2.
BNB_CPU_MIN = "0.50"


def check_bitsandbytes(device_type: str, version: str) -> None:
    """Refuse, before any work, a bitsandbytes whose 8-bit AdamW cannot step on ``device_type``."""
    if device_type == "cpu" and TorchVersion(version) < BNB_CPU_MIN:
        raise SlmkitError(f"optimizer 'adamw_8bit' on the CPU needs bitsandbytes >= {BNB_CPU_MIN} (this is "
                          f"{version}): pip install -U bitsandbytes, or use optimizer: adamw")


def import_bitsandbytes():
    """bitsandbytes, imported without its CPU backend's warning that it could not fetch a 4-bit matmul kernel
    from the Hugging Face hub (offline, or an untrusted repository): the optimizer does not use it."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise SlmkitError("optimizer 'adamw_8bit' needs bitsandbytes: pip install 'slmkit[bnb]'") from None
    finally:
        logger.setLevel(level)
    return bitsandbytes


def _optimizer(module: nn.Module, config: DistillConfig, device: torch.device) -> torch.optim.Optimizer:
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw_8bit":
        config.check_environment(device.type)  # bitsandbytes installed, and one that steps on this device
        return import_bitsandbytes().optim.AdamW8bit(groups, lr=config.learning_rate)
    return torch.optim.AdamW(groups, lr=config.learning_rate)


# FSDP2 across CPU processes (gloo) fails inside torch 2.6 ("'Stream' object has no attribute 'record_event'").
# Measured with tests/distill/test_ddp.py: torch 2.7 and 2.8 train, and from 2.9 (with accelerate 1.13+) the
# trained weights equal data parallelism's bit for bit.
FSDP_CPU_MIN_TORCH = "2.7"


def _check_distributed(accelerator, student: nn.Module, config: DistillConfig,
                       torch_version: str = torch.__version__) -> None:
    """Refuse, before any work, a launch configuration the trainer cannot run (``torch_version``: the
    installed torch's, a parameter for the tests)."""
    from slmkit.models.modeling import shares_ffn

    kind = accelerator.distributed_type.name
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise SlmkitError(f"slmkit.distill does not support {kind}; launch with DDP or FSDP2 "
                          "(recipes/accelerate/ddp.yaml, recipes/accelerate/fsdp.yaml)")
    if kind != "FSDP":
        return
    if not accelerator.is_fsdp2:
        raise SlmkitError("slmkit.distill shards with FSDP2 only; set fsdp_version: 2 in the accelerate config "
                          "(as recipes/accelerate/fsdp.yaml does)")
    if shares_ffn(student):
        raise SlmkitError("a student whose blocks share FFN weights cannot be sharded block by block; "
                          "launch with DDP (recipes/accelerate/ddp.yaml)")
    if config.optimizer == "adamw_8bit":
        raise SlmkitError("optimizer 'adamw_8bit' (bitsandbytes) does not take FSDP's sharded parameters; use "
                          "optimizer: adamw, or launch with DDP")
    if accelerator.device.type == "cpu" and TorchVersion(torch_version) < FSDP_CPU_MIN_TORCH:
        raise SlmkitError(f"FSDP across CPU processes needs torch >= {FSDP_CPU_MIN_TORCH} (this is {torch_version}); "
                          "upgrade torch, or launch with DDP (recipes/accelerate/ddp.yaml)")


class DistillTrainer:
    """One distillation run; ``train()`` does it. Built by :func:`slmkit.distill`, which checks the inputs."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config: DistillConfig, train_blocks: torch.Tensor,
                 eval_blocks: torch.Tensor, output_dir: Path | None, device: str | None):
        from torch.utils.data import DataLoader, TensorDataset
        from accelerate.utils import set_seed
        from transformers import get_cosine_schedule_with_warmup

        self.config, self.output_dir, self.student = config, output_dir, student
        self.accelerator = _new_accelerator(config, device, output_dir)
        self.sharded = self.accelerator.distributed_type.name == "FSDP"
        _check_distributed(self.accelerator, student, config)
        if train_blocks.shape[0] < config.micro_batch_size * self.accelerator.num_processes:
            raise SlmkitError(f"too little training data: {train_blocks.shape[0]} blocks make no batch of "
                              f"{config.micro_batch_size} per process; add data or lower micro_batch_size")
        set_seed(config.seed)
        # A student copied from a frozen model (such as the teacher of an earlier run, which this trainer
        # froze) trains all its float weights; a student with some weights frozen on purpose keeps them.
        if not any(param.requires_grad for param in student.parameters()):
            for param in student.parameters():
                param.requires_grad_(param.is_floating_point())
        self.pairs = layer_pairs(student, teacher, config)
        self.fingerprint = {"config": config.training_fingerprint(), "data": _tensor_digest(train_blocks),
                            "data_shape": list(train_blocks.shape),
                            "student_parameters": sum(p.numel() for p in student.parameters())}
        self.home = next(student.parameters()).device
        # FSDP replaces the parameters of the module it shards: it trains a copy, and the caller's student
        # (on the CPU meanwhile) gets the trained weights at the end
        trained = copy.deepcopy(student.to("cpu")) if self.sharded else student
        if config.gradient_checkpointing:
            _set_activation_checkpointing(trained, True)
        module = DistillModule(trained, self.pairs, teacher.config.hidden_size)
        pruned = {f"student.{name}" for name in pruned_weights(student)} if config.keep_sparsity else set()
        optimizer = _optimizer(module, config, self.accelerator.device)
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
        loader = DataLoader(TensorDataset(train_blocks), batch_size=config.micro_batch_size, shuffle=True,
                            drop_last=True, generator=torch.Generator().manual_seed(config.seed))
        # The scheduler is stepped once per optimizer step by this loop, so it is only registered for
        # checkpointing, not prepared (accelerate's wrapper steps it once per process).
        self.module, self.optimizer, self.loader = self.accelerator.prepare(module, optimizer, loader)
        self.accelerator.register_for_checkpointing(self.scheduler)
        # The teacher is not prepared: it needs no DDP wrapper, and accelerate would save it in every
        # checkpoint. Its forward passes run under accelerator.autocast().
        self.teacher = teacher.eval().requires_grad_(False).to(self.accelerator.device)
        self.eval_blocks = eval_blocks
        self.step, self.tokens, self.train_seconds = 0, 0, 0.0
        self.evals: list[dict[str, Any]] = []
        self.saved_step = -1
        self.step_rng_states: dict[str, Any] | None = None
        self.teacher_perplexity: float | None = None
        # after prepare: the weights are on the training device (and sharded, under FSDP)
        self.masks = sparsity_masks(self.accelerator.unwrap_model(self.module), pruned)

    # --- checkpoints and logs -------------------------------------------------------------------
    def resume(self) -> None:
        """Restore the newest complete checkpoint in the output directory."""
        found = checkpoint_dirs(self.output_dir) if self.output_dir is not None else []
        if not found:
            raise SlmkitError(f"nothing to resume: {self.output_dir} holds no complete checkpoint "
                              f"({CHECKPOINTS}/step-N); run without resume=True to start")
        latest = found[-1]
        state = json.loads((latest / STATE_FILE).read_text())
        if state["fingerprint"] != self.fingerprint:
            changed = [key for key in self.fingerprint if state["fingerprint"].get(key) != self.fingerprint[key]]
            if "config" in changed:
                old, new = state["fingerprint"]["config"], self.fingerprint["config"]
                changed = [f"config.{k}" for k in new if old.get(k) != new.get(k)] + changed[1:]
            raise SlmkitError(f"{latest} was written by a different run ({', '.join(changed)} changed); "
                              "resume with the same student, data and config, or start a new output directory")
        self.accelerator.load_state(str(latest))
        self.step, self.tokens, self.train_seconds = state["step"], state["tokens"], state["train_seconds"]
        self.evals, self.teacher_perplexity = state["evals"], state["teacher_perplexity"]
        self.saved_step = self.step
        self._truncate_log()
        self._print(f"slmkit: resumed from {latest} at step {self.step}/{self.config.steps}")

    def save_checkpoint(self) -> None:
        """Write the state at the current step to ``checkpoints/step-N`` (temp dir, then rename)."""
        if self.output_dir is None or self.saved_step == self.step:
            return
        root = self.output_dir / CHECKPOINTS
        final, tmp = root / f"step-{self.step:08d}", root / f".tmp-step-{self.step:08d}"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()  # every process has written its part (its RNG states, its shards)
        if self.accelerator.is_main_process:
            state = {"step": self.step, "tokens": self.tokens, "train_seconds": self.train_seconds,
                     "evals": self.evals, "teacher_perplexity": self.teacher_perplexity,
                     "fingerprint": self.fingerprint}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in checkpoint_dirs(self.output_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.saved_step = self.step

    def _truncate_log(self) -> None:
        """Drop log lines past the resumed step (they are about to be redone)."""
        path = self.output_dir / LOG_FILE
        if not self.accelerator.is_main_process or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
        path.write_text("".join(line + "\n" for line in kept))

    def _log(self, entry: dict[str, Any]) -> None:
        if self.output_dir is not None and self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / LOG_FILE, "a") as log:
                log.write(json.dumps(entry) + "\n")
        if self.accelerator.log_with:
            numbers = {f"{entry['kind']}/{k}": v for k, v in entry.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(numbers, step=entry["step"])

    def _print(self, text: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(text)

    # --- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out perplexity of the student, and its KL / top-1 agreement against the teacher."""
        device = self.accelerator.device

        def student_logits(batch: torch.Tensor) -> torch.Tensor:
            with self.accelerator.autocast():
                return self.module(batch.to(device))[0]

        def teacher_logits(batch: torch.Tensor) -> torch.Tensor:
            with self.accelerator.autocast():
                return self.teacher(input_ids=batch.to(device), use_cache=False).logits

        self.module.eval()
        scores = score_windows(student_logits, teacher_logits, self.eval_blocks, self.config.micro_batch_size,
                               progress=False)
        self.module.train()
        self.teacher_perplexity = metrics.perplexity(scores.reference_nll_sum, scores.count)
        result = {"kind": "eval", "step": self.step, "tokens": self.tokens,
                  "perplexity": metrics.perplexity(scores.nll_sum, scores.count),
                  "kl": scores.kl.double().mean().item(), "top1_agreement": scores.agree / scores.count,
                  "teacher_perplexity": self.teacher_perplexity}
        if not self.evals or self.evals[-1]["step"] != self.step:
            self.evals.append(result)
            self._log(result)
        self._print(f"slmkit: step {self.step}: held-out perplexity {result['perplexity']:.3f} "
                    f"(teacher {self.teacher_perplexity:.3f}), KL {result['kl']:.4f}, "
                    f"top-1 agreement {result['top1_agreement']:.2%}")
        return result

    # --- training -------------------------------------------------------------------------------
    def _batches(self):
        """Micro-batches from the current data position on, epoch after epoch (same order when resumed)."""
        per_epoch = len(self.loader)
        epoch, skip = divmod(self.step * self.config.accumulation_steps, per_epoch)
        while True:
            self.loader.set_epoch(epoch)
            source = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
            for (batch,) in source:
                yield batch
            epoch, skip = epoch + 1, 0

    def _is_on_policy(self) -> bool:
        """Whether this optimizer step trains on student continuations (same answer on every process)."""
        if self.config.mode != "mixed":
            return self.config.mode == "on_policy"
        return random.Random(self.config.seed * 1_000_003 + self.step).random() < self.config.on_policy_fraction

    @torch.no_grad()
    def _student_continuations(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt = the first prompt_len tokens; the student samples max_new_tokens after it.

        Returns the sequences (B, prompt_len + max_new_tokens) and the mask of positions predicting a
        sampled token.
        """
        from transformers import GenerationConfig

        config = self.config
        prompts = batch[:, : config.prompt_len]
        student = self.accelerator.unwrap_model(self.module).student
        student.eval()
        generation = GenerationConfig(do_sample=True, max_new_tokens=config.max_new_tokens, temperature=1.0,
                                      top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
        with self.accelerator.autocast(), self._whole_root():
            sequences = student.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                         generation_config=generation)
        student.train()
        mask = torch.zeros_like(sequences, dtype=torch.bool)
        mask[:, config.prompt_len - 1 : -1] = True  # (B, T): positions whose next token was sampled
        return sequences, mask

    @contextlib.contextmanager
    def _whole_root(self):
        """Under FSDP, the weights that no block holds (embeddings, final norm, projections) gathered whole.

        ``generate`` calls the student, not the sharded root module whose forward would gather them."""
        if not self.sharded:
            yield
            return
        self.module.unshard()
        try:
            yield
        finally:
            self.module.reshard()

    def _micro_batch_loss(self, batch: torch.Tensor, on_policy: bool) -> dict[str, torch.Tensor]:
        config = self.config
        if on_policy:
            tokens, mask = self._student_continuations(batch)
        else:
            tokens, mask = batch, torch.ones_like(batch, dtype=torch.bool)
        with torch.no_grad(), self.accelerator.autocast():
            teacher_out = self.teacher(input_ids=tokens, use_cache=False, output_hidden_states=bool(self.pairs))
            teacher_log_probs, top_indices = losses.teacher_targets(teacher_out.logits, config.temperature, config.top_k)
            teacher_hidden = [teacher_out.hidden_states[t + 1] for _, t in self.pairs]
            del teacher_out  # the full teacher logits are not needed past this point
        with self.accelerator.autocast():
            logits, student_hidden = self.module(tokens)
        parts = {"kd": losses.logit_distillation_loss(logits, teacher_log_probs, mask, config.loss, config.temperature,
                                                      top_indices, config.beta, config.skew)}
        ce_weight = 0.0 if on_policy else config.ce_weight  # the student's own samples are no CE target
        total = (1 - ce_weight) * parts["kd"]
        if ce_weight > 0:
            parts["ce"] = losses.next_token_cross_entropy(logits, tokens, mask)
            total = total + ce_weight * parts["ce"]
        if self.pairs:
            parts["hidden"] = sum(losses.hidden_state_loss(s, t, mask) for s, t in zip(student_hidden, teacher_hidden))
            parts["hidden"] = parts["hidden"] / len(self.pairs)
            total = total + config.hidden_weight * parts["hidden"]
        parts["loss"] = total
        return parts

    def _apply_masks(self) -> None:
        with torch.no_grad():
            for parameter, keep in self.masks:
                parameter.mul_(keep)

    def _optimizer_step(self, batches) -> dict[str, float]:
        """Accumulate gradients over the micro-batches of one step, clip, update; returns the mean losses."""
        config, accelerator = self.config, self.accelerator
        self.step_rng_states = _rng_states()  # an interrupted step is redone from these on resume
        on_policy = self._is_on_policy()
        sums: dict[str, float] = {}
        tokens = 0
        for index in range(config.accumulation_steps):
            batch = next(batches)
            last = index == config.accumulation_steps - 1
            # gradients are all-reduced across processes only on the last micro-batch
            with contextlib.nullcontext() if last else accelerator.no_sync(self.module):
                parts = self._micro_batch_loss(batch, on_policy)
                accelerator.backward(parts["loss"] / config.accumulation_steps)
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value.item() / config.accumulation_steps
            tokens += batch.shape[0] * (config.prompt_len + config.max_new_tokens if on_policy else batch.shape[1])
        grad_norm = (accelerator.clip_grad_norm_(self.module.parameters(), config.max_grad_norm)
                     if config.max_grad_norm > 0 else None)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._apply_masks()
        self.step += 1
        self.step_rng_states = None  # the step is finished: nothing to rewind
        self.tokens += tokens * accelerator.num_processes
        sums["lr"] = self.scheduler.get_last_lr()[0]
        if grad_norm is not None:
            sums["grad_norm"] = float(grad_norm)
        sums["on_policy"] = on_policy
        return sums

    def train(self) -> None:
        """Run (or finish) the training; evaluates at the start, every eval_every steps and at the end."""
        config = self.config
        if self.accelerator.log_with:
            self.accelerator.init_trackers("distill", config={k: str(v) for k, v in config.to_dict().items()})
        if not self.evals:
            self.evaluate()
        self.module.train()
        batches = self._batches()
        progress = tqdm(total=config.steps, initial=self.step, desc="distilling", unit="step",
                        disable=not self.accelerator.is_local_main_process)
        try:
            while self.step < config.steps:
                start = time.perf_counter()
                tokens_before = self.tokens
                result = self._optimizer_step(batches)
                seconds = time.perf_counter() - start
                self.train_seconds += seconds
                speed = (self.tokens - tokens_before) / seconds
                progress.update(1)
                progress.set_postfix(loss=f"{result['loss']:.4f}", tok_s=f"{speed:,.0f}")
                if self.step % config.log_every == 0 or self.step == config.steps:
                    self._log({"kind": "train", "step": self.step, "tokens": self.tokens,
                               **{k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()},
                               "tokens_per_s": round(speed, 1)})
                if (config.eval_every and self.step % config.eval_every == 0) or self.step == config.steps:
                    self.evaluate()
                if self.step % config.save_every == 0 or self.step == config.steps:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            progress.close()
            if self.output_dir is not None and self.accelerator.num_processes == 1:
                if self.step_rng_states is not None:
                    _set_rng_states(self.step_rng_states)  # as they were when the unfinished step began
                self.save_checkpoint()
                self._print(f"slmkit: interrupted; step {self.step} saved in {self.output_dir / CHECKPOINTS}; "
                            "run again with resume=True (or the same recipe and output) to continue")
            raise
        finally:
            progress.close()
            # not `accelerator.end_training()`: it also destroys the process group, which the caller still
            # needs (FSDP's final gather below, the next steps of a recipe, the caller's own script)
            for tracker in self.accelerator.trackers:
                tracker.finish()
        self.module.eval()
        if self.sharded:
            self._gather_into_student()
        elif config.gradient_checkpointing:
            _set_activation_checkpointing(self.student, False)

    def _gather_into_student(self) -> None:
        """Copy the trained (sharded) weights, whole, into the caller's student, and put it back on its device."""
        from torch.distributed.tensor import DTensor

        trained = dict(self.accelerator.unwrap_model(self.module).student.named_parameters())
        targets = dict(self.student.named_parameters())
        if trained.keys() != targets.keys():
            raise SlmkitError("FSDP changed the student's parameter names; cannot copy the trained weights back")
        with torch.no_grad():
            for name, parameter in trained.items():  # one whole weight at a time: no full copy of the model
                whole = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
                targets[name].copy_(whole.to(targets[name].dtype))
        self.student.to(self.home)

    def summary(self) -> dict[str, Any]:
        """What the run did and measured (stored in the student's record, hence its checkpoint manifest)."""
        return {"steps": self.step, "tokens": self.tokens, "train_seconds": round(self.train_seconds, 2),
                "tokens_per_s": round(self.tokens / self.train_seconds, 1) if self.train_seconds else math.nan,
                "device": self.accelerator.device.type, "processes": self.accelerator.num_processes,
                "distributed": self.accelerator.distributed_type.name,
                "mixed_precision": self.accelerator.mixed_precision, "evals": self.evals}
