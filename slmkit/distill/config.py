"""``DistillConfig``: everything a distillation run does (losses, teacher, optimization, data, logging)."""

from __future__ import annotations

import dataclasses
from typing import Any

from slmkit.config import BaseConfig, ConfigError, check_choice, check_range, check_type, config_from_step
from slmkit.data import DataConfig
from slmkit.distill.losses import LOSSES
from slmkit.eval import EvalConfig

MODES = ("off_policy", "on_policy", "mixed")
OPTIMIZERS = ("adamw", "adamw_8bit")
PRECISIONS = ("auto", "no", "bf16", "fp16")


def _nested(value: Any, cls: type[BaseConfig], field: str) -> BaseConfig:
    """Accept a nested config as an instance or as a dict (from a recipe)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls.from_dict(value, where=field)
    raise ConfigError(f"{field} must be a mapping of {cls.__name__} fields, got {value!r}")


@dataclasses.dataclass
class DistillConfig(BaseConfig):
    """Teacher → student distillation (``slmkit.distill``; the ``distill`` recipe step).

    The loss per optimizer step is ``(1 − ce_weight)·KD + ce_weight·CE + hidden_weight·hidden``, where KD is
    the chosen divergence between teacher and student next-token distributions (see
    ``slmkit.distill.losses``), CE the next-token cross-entropy on the data (off-policy batches only) and
    hidden the normalized MSE between mapped hidden states.
    """

    name = "distill"
    category = "distill"

    # --- losses ---
    loss: str = "forward_kl"  # forward_kl, reverse_kl (MiniLLM), jsd (GKD), skew_kl, skew_reverse_kl (DistiLLM)
    temperature: float = 1.0  # softens both distributions; the KD loss is scaled by temperature²
    beta: float = 0.5  # jsd: mixture weight of the teacher, in (0, 1)
    skew: float = 0.1  # skew KLs: weight of the skewed-toward distribution, in (0, 1)
    top_k: int | None = None  # keep only the teacher's top-k logits per position (memory); None = full vocab
    ce_weight: float = 0.0  # mix of next-token cross-entropy on the data, in [0, 1]
    hidden_weight: float = 0.0  # weight of the hidden-state loss (0 = off)
    hidden_layers: list[list[int]] | None = None  # [[student_block, teacher_block], ...]; None = uniform depth map
    # --- on-policy ---
    mode: str = "off_policy"  # off_policy (data text), on_policy (student continuations), mixed
    on_policy_fraction: float = 0.5  # mixed: fraction of optimizer steps that are on-policy
    prompt_len: int = 64  # on-policy: tokens of data text used as the prompt
    max_new_tokens: int = 64  # on-policy: tokens the student samples after the prompt
    # --- teacher ---
    teacher: str | None = None  # load_model source for recipes (None: the recipe's original model)
    teacher_quantize: dict[str, Any] | None = None  # quantize the teacher first, e.g. {smoothquant: {alpha: 0.5}}
    # --- optimization ---
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # sequences per optimizer step and process (= micro_batch_size × accumulation)
    micro_batch_size: int = 4  # sequences per forward/backward pass
    learning_rate: float = 5e-5  # peak learning rate
    warmup_steps: int = 10  # linear warmup, then cosine decay to 0
    weight_decay: float = 0.0  # AdamW weight decay (matrices only)
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    optimizer: str = "adamw"  # adamw or adamw_8bit (bitsandbytes)
    mixed_precision: str = "auto"  # auto (bf16 on CUDA GPUs that support it, else none), no, bf16, fp16
    gradient_checkpointing: bool = False  # trade compute for activation memory
    keep_sparsity: bool = True  # weights pruned to ≥ 10 % exact zeros stay zero (sparsity masks re-applied)
    seed: int = 0
    # --- data, evaluation, checkpoints ---
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(num_blocks=1024, block_len=512))
    eval: EvalConfig = dataclasses.field(default_factory=lambda: EvalConfig(max_tokens=8192, seq_len=512))
    eval_every: int = 50  # evaluate (perplexity, KL and top-1 vs the teacher) every N steps (0 = start and end only)
    log_every: int = 10  # log the training loss every N steps
    save_every: int = 50  # checkpoint every N steps (needs an output directory)
    keep_checkpoints: int = 2  # how many recent checkpoints to keep

    def check_environment(self, device: str) -> None:
        """The 8-bit optimizer needs bitsandbytes, and on the CPU one whose 8-bit AdamW steps there."""
        if self.optimizer == "adamw_8bit":
            from slmkit.distill.trainer import check_bitsandbytes, import_bitsandbytes

            check_bitsandbytes(device.split(":")[0], import_bitsandbytes().__version__)

    def __post_init__(self):
        check_choice("loss", self.loss, LOSSES)
        check_range("temperature", self.temperature, 1e-3, 100.0)
        check_range("beta", self.beta, 1e-6, 1 - 1e-6)
        check_range("skew", self.skew, 1e-6, 1 - 1e-6)
        if self.top_k is not None:
            check_range("top_k", self.top_k, 1, 10_000_000, int)
        check_range("ce_weight", self.ce_weight, 0.0, 1.0)
        check_range("hidden_weight", self.hidden_weight, 0.0, 1e6)
        if self.hidden_layers is not None:
            check_type("hidden_layers", self.hidden_layers, list)
            for pair in self.hidden_layers:
                if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in pair)):
                    raise ConfigError(f"hidden_layers must be a list of [student_block, teacher_block] pairs, got {pair!r}")
            self.hidden_layers = [list(pair) for pair in self.hidden_layers]
        check_choice("mode", self.mode, MODES)
        check_range("on_policy_fraction", self.on_policy_fraction, 0.0, 1.0)
        check_range("prompt_len", self.prompt_len, 1, 1_000_000, int)
        check_range("max_new_tokens", self.max_new_tokens, 1, 1_000_000, int)
        if self.teacher is not None:
            check_type("teacher", self.teacher, str)
        if self.teacher_quantize is not None:
            self.teacher_quantize_config()
        check_range("steps", self.steps, 1, 100_000_000, int)
        check_range("batch_size", self.batch_size, 1, 1_000_000, int)
        check_range("micro_batch_size", self.micro_batch_size, 1, self.batch_size, int)
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                              f"({self.micro_batch_size})")
        check_range("learning_rate", self.learning_rate, 0.0, 10.0)
        check_range("warmup_steps", self.warmup_steps, 0, 100_000_000, int)
        check_range("weight_decay", self.weight_decay, 0.0, 10.0)
        check_range("max_grad_norm", self.max_grad_norm, 0.0, 1e6)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        check_type("gradient_checkpointing", self.gradient_checkpointing, bool)
        check_type("keep_sparsity", self.keep_sparsity, bool)
        check_type("seed", self.seed, int)
        self.data = _nested(self.data, DataConfig, "data")
        self.eval = _nested(self.eval, EvalConfig, "eval")
        check_range("eval_every", self.eval_every, 0, 100_000_000, int)
        check_range("log_every", self.log_every, 1, 100_000_000, int)
        check_range("save_every", self.save_every, 1, 100_000_000, int)
        check_range("keep_checkpoints", self.keep_checkpoints, 1, 1000, int)
        if self.mode == "mixed" and not 0 < self.on_policy_fraction < 1:
            raise ConfigError(f"on_policy_fraction must be in (0, 1) with mode 'mixed', got {self.on_policy_fraction!r}")

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self.batch_size // self.micro_batch_size

    def teacher_quantize_config(self) -> BaseConfig | None:
        """The quantization step applied to the teacher before training (None: keep it as loaded)."""
        if self.teacher_quantize is None:
            return None
        import slmkit.quantize  # noqa: F401  (registers the quantization steps)

        step = config_from_step(self.teacher_quantize, "teacher_quantize")
        if step.category != "quantize":
            raise ConfigError(f"teacher_quantize must be a quantization step, got {step.name!r} ({step.category})")
        return step

    def token_lengths(self) -> dict[str, int]:
        """Training blocks, evaluation windows and (on-policy) prompt plus sampled tokens."""
        lengths = {"data.block_len": self.data.block_len, "eval.seq_len": self.eval.seq_len}
        if self.mode != "off_policy":
            lengths["prompt_len + max_new_tokens"] = self.prompt_len + self.max_new_tokens
        return lengths

    def training_fingerprint(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run that wrote the checkpoint (all but logging)."""
        fields = self.to_dict()
        for name in ("eval_every", "log_every", "save_every", "keep_checkpoints"):
            fields.pop(name)
        return fields
