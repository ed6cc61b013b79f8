"""Size/memory measurements and the evaluation report (JSON-ready dataclass + readable table)."""

from __future__ import annotations

import dataclasses
import resource
import sys
from typing import Any

import torch
from torch import nn


def unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor of the state dict once (tied weights count once, as they are stored once)."""
    seen, tensors = set(), []
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            tensors.append(tensor)
    return tensors


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (tied ones once); quantized weights held in buffers are not counted."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def weight_count(model: nn.Module) -> int:
    """Number of stored weight elements (parameters and quantized weight buffers, tied ones once)."""
    return sum(t.numel() for t in unique_tensors(model))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all stored tensors: what the safetensors file holds, less its small header."""
    return sum(t.numel() * t.element_size() for t in unique_tensors(model))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory since the last reset (CUDA) or the process's peak resident memory (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


@dataclasses.dataclass
class EvalReport:
    """Quality, size and cost of a model on held-out text, optionally against a reference model."""

    tokens: int  # predicted tokens scored
    perplexity: float
    weights: int  # stored weight elements
    weight_bytes: int
    peak_memory_bytes: int  # CUDA peak allocated, or process peak RSS on CPU
    seconds: float
    device: str
    data: dict[str, Any]  # the EvalConfig used, and tokens_sha256: the fingerprint of the tokens scored
    reference_perplexity: float | None = None
    reference_weight_bytes: int | None = None
    kl_mean: float | None = None  # nats per token, KL(reference ‖ model)
    kl_p99: float | None = None
    top1_agreement: float | None = None  # fraction of positions with the same argmax token

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return dataclasses.asdict(self)

    def table(self) -> str:
        """A readable table: reference vs model when a reference was given."""
        mb = lambda b: f"{b / 1e6:,.1f} MB" if b is not None else "-"  # noqa: E731
        rows = [("held-out tokens", f"{self.tokens:,}", "")]
        if self.reference_perplexity is not None:
            change = 100.0 * (self.perplexity / self.reference_perplexity - 1.0)
            ratio = self.weight_bytes / self.reference_weight_bytes if self.reference_weight_bytes else None
            rows += [
                ("perplexity (reference → model)", f"{self.reference_perplexity:.3f} → {self.perplexity:.3f}",
                 f"{change:+.2f}%"),
                ("weights (reference → model)", f"{mb(self.reference_weight_bytes)} → {mb(self.weight_bytes)}",
                 f"×{ratio:.3f}" if ratio else ""),
                ("KL mean / p99 (nats/token)", f"{self.kl_mean:.4f} / {self.kl_p99:.4f}", ""),
                ("top-1 agreement", f"{100 * self.top1_agreement:.2f}%", ""),
            ]
        else:
            rows += [("perplexity", f"{self.perplexity:.3f}", ""), ("weights", mb(self.weight_bytes), "")]
        rows += [
            ("stored weight elements", f"{self.weights:,}", ""),
            ("peak memory", mb(self.peak_memory_bytes) + (" (process RSS)" if self.device == "cpu" else ""), ""),
            ("evaluation time", f"{self.seconds:.1f} s on {self.device}", ""),
        ]
        width = max(len(r[0]) for r in rows)
        value_width = max(len(r[1]) for r in rows)
        return "\n".join(f"{a:<{width}}  {b:<{value_width}}  {c}".rstrip() for a, b, c in rows)
