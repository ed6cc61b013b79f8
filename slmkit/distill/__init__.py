"""Knowledge distillation: ``slmkit.distill(student, teacher, DistillConfig(...), data=...)``.

Heals a compressed student (pruned, shared-FFN, narrower) by training it to match the uncompressed
teacher's next-token distributions on text (off-policy) or on its own samples (on-policy), with the
losses of :mod:`slmkit.distill.losses`. Training runs on accelerate: one CPU, one GPU, or several GPUs
and nodes with ``accelerate launch`` (see ``recipes/accelerate/``), resumable after a crash or Ctrl-C.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from slmkit.config import StepContext, register
from slmkit.data import DataConfig, token_blocks
from slmkit.distill.config import DistillConfig
from slmkit.distill.trainer import DistillTrainer, check_pair, checkpoint_dirs
from slmkit.errors import SlmkitError
from slmkit.models.arch import check_context
from slmkit.models.record import get_record, require_model


def _blocks(data, config: DataConfig, tokenizer, what: str) -> torch.Tensor:
    """Token blocks (N, L) from a tensor, a DataConfig, or None (the config's text)."""
    if data is None:
        data = config
    if isinstance(data, DataConfig):
        return token_blocks(tokenizer, data)
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.dtype != torch.long:
        raise SlmkitError(f"{what} must be token ids (num_blocks, block_len) as a LongTensor or a DataConfig, "
                          f"got {type(data).__name__}{tuple(data.shape) if isinstance(data, torch.Tensor) else ''}")
    if data.numel() == 0:
        raise SlmkitError(f"{what} is empty ({tuple(data.shape)}); give at least one block of tokens")
    return data


TEACHER_CALIB_BLOCKS = 32  # training blocks that calibrate the teacher's quantization


def _quantize_teacher(teacher: nn.Module, config: DistillConfig, train_blocks: torch.Tensor) -> None:
    """Quantize the teacher as ``config.teacher_quantize`` says, calibrated on the first training blocks."""
    step = config.teacher_quantize_config()
    if step is not None:
        from slmkit.config import apply_step

        print(f"slmkit: quantizing the teacher ({step.name}) to save memory")
        apply_step(teacher, step, train_blocks[:TEACHER_CALIB_BLOCKS], category="quantize")


def _train(student: nn.Module, teacher: nn.Module, config: DistillConfig, data, eval_data,
           output_dir: str | os.PathLike | None, resume: bool, device: str | None) -> None:
    """Check the inputs, then run the trainer (``distill`` without recording the step)."""
    if not isinstance(config, DistillConfig):
        raise SlmkitError(f"expected a DistillConfig, got {type(config).__name__}")
    check_pair(student, teacher)
    output_dir = Path(output_dir).expanduser() if output_dir is not None else None
    if resume and (output_dir is None or not output_dir.is_dir()):
        raise SlmkitError(f"resume=True needs the output directory of an earlier run; {output_dir} does not exist")
    if not resume and output_dir is not None and checkpoint_dirs(output_dir):
        raise SlmkitError(f"{output_dir} holds checkpoints of an earlier run; pass resume=True (--resume) to "
                          "continue it, or choose another directory")
    tokenizer = get_record(student).tokenizer or get_record(teacher).tokenizer
    train_blocks = _blocks(data, config.data, tokenizer, "data")
    eval_blocks = _blocks(eval_data, config.eval.data_config(), tokenizer, "eval_data")
    for model, who in ((student, "student"), (teacher, "teacher")):
        check_context(model, train_blocks.shape[1], f"the training block length (for the {who})")
        check_context(model, eval_blocks.shape[1], f"the evaluation window (for the {who})")
        if config.mode != "off_policy":
            check_context(model, config.prompt_len + config.max_new_tokens,
                          f"prompt_len + max_new_tokens (for the {who})")
    if config.mode != "off_policy" and config.prompt_len > train_blocks.shape[1]:
        raise SlmkitError(f"prompt_len ({config.prompt_len}) is longer than the training blocks "
                          f"({train_blocks.shape[1]} tokens)")
    _quantize_teacher(teacher, config, train_blocks)

    trainer = DistillTrainer(student, teacher, config, train_blocks, eval_blocks, output_dir, device)
    if resume:
        trainer.resume()
    trainer.train()
    get_record(student).metrics["distill"] = trainer.summary()


def distill(student: nn.Module, teacher: nn.Module | str, config: DistillConfig | None = None,
            data: torch.Tensor | DataConfig | None = None, eval_data: torch.Tensor | DataConfig | None = None,
            output_dir: str | os.PathLike | None = None, resume: bool = False, device: str | None = None):
    """Train ``student`` in place to imitate ``teacher``; returns the student.

    Args:
        student: the model to train (e.g. a pruned copy of the teacher); float weights, same tokenizer.
        teacher: the frozen reference (eval mode, no gradients; moved to the training device, and
            quantized in place first when ``config.teacher_quantize`` says so), or a ``load_model`` source
            (e.g. ``"smollm2-135m"``) to load it from.
        config: losses, optimization, data and logging (:class:`DistillConfig`).
        data: training token ids (num_blocks, block_len), or a DataConfig; None = ``config.data``
            (the embedded corpus's calibration split).
        eval_data: held-out token ids, or a DataConfig; None = ``config.eval`` (the embedded held-out split).
        output_dir: where the JSONL log (and TensorBoard's, when installed) and checkpoints go; None = no
            files, no resume. A directory holding checkpoints of an earlier run is refused unless ``resume``.
        resume: continue the run in ``output_dir`` from its newest checkpoint, exactly where it stopped.
        device: "cpu" or "cuda"; None = a GPU when there is one (under ``accelerate launch``: its device).

    The run's evaluations (held-out perplexity, KL and top-1 agreement against the teacher, at the start,
    every ``eval_every`` steps and at the end), tokens/s and steps are stored in
    ``student.slmkit.metrics["distill"]`` and so in a saved checkpoint's manifest.

    Example:
        >>> teacher = slmkit.load_model("smollm2-135m")
        >>> student = slmkit.prune(slmkit.load_model("smollm2-135m"), WidthPruneConfig(ffn=0.25))
        >>> slmkit.distill(student, teacher, DistillConfig(steps=500), output_dir="runs/heal")
    """
    config = config or DistillConfig()
    require_model(student, "slmkit.distill (student)")
    if isinstance(teacher, (str, os.PathLike)):
        from slmkit.models.loading import load_model

        teacher = load_model(teacher)
    _train(student, teacher, config, data, eval_data, output_dir, resume, device)
    get_record(student).steps.append({config.name: config.to_dict()})
    return student


@register(DistillConfig, uses_context=True)
def _distill_step(model: nn.Module, config: DistillConfig, context: StepContext) -> nn.Module:
    """The recipe step: load the teacher (``config.teacher`` or the recipe's model) and distill into ``model``.

    In a recipe run with an output, the trainer's log and checkpoints live in the run's work directory,
    so re-running the recipe resumes the distillation where it stopped.
    """
    from slmkit.models.loading import load_model

    teacher = load_model(config.teacher or context.original_model, device="cpu")
    work_dir = context.work_dir
    resume = work_dir is not None and bool(checkpoint_dirs(work_dir))
    device = None if context.device in (None, "auto") else str(context.device).split(":")[0]
    _train(model, teacher, config, None, None, work_dir, resume, device)
    return model


__all__ = ["DistillConfig", "distill"]
