"""``slmkit.evaluate``: perplexity on held-out text, and KL / top-1 agreement against a reference model."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from slmkit.config import BaseConfig, ConfigError, check_range, check_type
from slmkit.data import DataConfig, token_blocks
from slmkit.errors import SlmkitError
from slmkit.eval import metrics
from slmkit.eval.report import EvalReport, peak_memory_bytes, weight_bytes, weight_count
from slmkit.models.arch import check_context
from slmkit.models.record import get_record, require_model


@dataclasses.dataclass
class EvalConfig(BaseConfig):
    """What to evaluate on: held-out text cut into fixed-length windows."""

    source: str = "embedded"  # text source (see slmkit.data); the embedded corpus's "eval" split by default
    split: str = "eval"
    max_tokens: int = 16384  # tokens evaluated: max_tokens // seq_len windows, evenly spread over the text
    seq_len: int = 1024  # window length
    batch_size: int = 1  # windows per forward pass

    def __post_init__(self):
        check_type("source", self.source, str)
        check_range("seq_len", self.seq_len, 2, 1_000_000, int)
        check_range("max_tokens", self.max_tokens, 1, 1_000_000_000, int)
        if self.max_tokens < self.seq_len:
            raise ConfigError(f"max_tokens ({self.max_tokens}) must be at least seq_len ({self.seq_len}): "
                              "the text is scored in whole windows of seq_len tokens")
        check_range("batch_size", self.batch_size, 1, 65536, int)
        self.data_config()  # validates split

    def data_config(self) -> DataConfig:
        """The DataConfig selecting the evaluation windows."""
        return DataConfig(source=self.source, split=self.split, num_blocks=self.max_tokens // self.seq_len,
                          block_len=self.seq_len, sampling="spread")


def windows_fingerprint(windows: torch.Tensor) -> str:
    """First 16 hex digits of the SHA-256 of the token ids ``windows`` (as int64): results whose
    fingerprints match scored the same tokens. What a source gives can change between environments
    (``python-docs`` follows the Python version; another tokenizer may split or separate it otherwise), so
    reports record it."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens.to(_device_of(model)), use_cache=False).logits


@dataclasses.dataclass
class WindowScores:
    """Totals over evaluation windows (see :func:`score_windows`)."""

    nll_sum: float  # the model's summed next-token NLL
    count: int  # predicted tokens
    reference_nll_sum: float = 0.0  # the reference's, when there is one
    kl: torch.Tensor | None = None  # per predicted token KL(reference ‖ model), on the CPU
    agree: int = 0  # predicted tokens where both models' top-1 tokens agree


def score_windows(logits_of: Callable[[torch.Tensor], torch.Tensor],
                  reference_logits_of: Callable[[torch.Tensor], torch.Tensor] | None,
                  windows: torch.Tensor, batch_size: int, progress: bool = True) -> WindowScores:
    """Run a model (and optionally its reference) over token windows (N, T) and total the metrics.

    ``logits_of(batch)`` returns the model's logits (B, T, V) for a CPU batch of token ids; positions
    0..T-2 predict a scored token (the last position predicts beyond the window).
    """
    nll_sum, reference_nll_sum, count, agree, kl_values = 0.0, 0.0, 0, 0, []
    batches = range(0, windows.shape[0], batch_size)
    with torch.no_grad():
        for first in tqdm(batches, desc="evaluating", unit="batch", disable=not progress):
            batch = windows[first : first + batch_size]  # (B, T)
            logits = logits_of(batch)  # (B, T, V)
            target = batch.to(logits.device)
            nll_sum += metrics.token_nll(logits, target).sum().item()
            count += target[:, 1:].numel()
            if reference_logits_of is not None:
                reference_logits = reference_logits_of(batch).to(logits.device)
                reference_nll_sum += metrics.token_nll(reference_logits, target).sum().item()
                kl_values.append(metrics.token_kl(reference_logits[:, :-1], logits[:, :-1]).flatten().cpu())
                agree += metrics.top1_agreement(reference_logits[:, :-1], logits[:, :-1]).sum().item()
    kl = torch.cat(kl_values) if kl_values else None
    return WindowScores(nll_sum, count, reference_nll_sum, kl, agree)


def evaluate(model: nn.Module, reference: nn.Module | str | None = None, config: EvalConfig | None = None,
             tokenizer=None) -> EvalReport:
    """Measure ``model`` on held-out text; against ``reference`` also KL divergence and top-1 agreement.

    Args:
        model: the model to measure (compressed or not).
        reference: the uncompressed model, or a source for ``load_model`` (e.g. ``"smollm2-135m"``).
        config: EvalConfig (text, tokens, window length); defaults to 16,384 tokens of the embedded
            corpus's held-out split in 1,024-token windows.
        tokenizer: needed only for models not loaded through slmkit.

    Returns:
        An EvalReport (``.to_dict()`` for JSON, ``.table()`` to print). It is also stored in
        ``model.slmkit.metrics["eval"]`` and so written into a saved checkpoint's manifest.

    Example:
        >>> report = slmkit.evaluate(model, reference="smollm2-135m")
        >>> print(report.table())
    """
    require_model(model, "slmkit.evaluate")
    config = config or EvalConfig()
    check_context(model, config.seq_len, "the evaluation window (seq_len)")  # before loading a reference
    if isinstance(reference, str):
        from slmkit.models.loading import load_model

        reference = load_model(reference, device=_device_of(model))
    if reference is not None:
        check_context(reference, config.seq_len, "the evaluation window (seq_len, for the reference)")
    tokenizer = tokenizer or get_record(model).tokenizer
    if tokenizer is None and reference is not None:
        tokenizer = get_record(reference).tokenizer
    windows = token_blocks(tokenizer, config.data_config())  # (num_windows, seq_len)
    if reference is not None and reference.config.vocab_size != model.config.vocab_size:
        raise SlmkitError(
            f"reference vocabulary ({reference.config.vocab_size}) differs from the model's "
            f"({model.config.vocab_size}); KL needs the same tokenizer"
        )
    device = _device_of(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    scores = score_windows(lambda batch: _logits(model, batch),
                           None if reference is None else (lambda batch: _logits(reference, batch)),
                           windows, config.batch_size)
    seconds = time.perf_counter() - start
    count = scores.count
    report = EvalReport(
        tokens=count,
        perplexity=metrics.perplexity(scores.nll_sum, count),
        weights=weight_count(model),
        weight_bytes=weight_bytes(model),
        peak_memory_bytes=peak_memory_bytes(device),
        seconds=seconds,
        device=device.type,
        data={**config.to_dict(), "tokens_sha256": windows_fingerprint(windows)},
    )
    if reference is not None:
        kl = scores.kl.double()
        report.reference_perplexity = metrics.perplexity(scores.reference_nll_sum, count)
        report.reference_weight_bytes = weight_bytes(reference)
        report.kl_mean = kl.mean().item()
        report.kl_p99 = torch.quantile(kl, 0.99).item()
        report.top1_agreement = scores.agree / count
    get_record(model).metrics["eval"] = report.to_dict()
    return report
