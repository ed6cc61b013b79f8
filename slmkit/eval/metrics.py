"""Pure metric functions on logits (no model walking).

For a window of T tokens the model predicts tokens 1..T-1 from logits 0..T-2.
KL is measured per predicted token as KL(P_reference ‖ P_model) = Σ p_ref (log p_ref − log p_model),
the divergence of the compressed model from the original (in nats).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each next token: logits (B, T, V), tokens (B, T) → (B, T-1)."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    return -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ p (log p − log q) over the last dim, from log-probabilities.

    Log-probabilities are floored at log(smallest normal float): probabilities below it (≈1e-38 in float32)
    contribute nothing measurable, and without the floor their exponentials are denormal numbers, which
    CPUs process ~10× slower (a 49k-token vocabulary has thousands per position). The floor also turns
    p = 0 (log p = −inf) into a negligible term instead of 0 · ∞ = NaN.
    """
    floor = math.log(torch.finfo(log_p.dtype).tiny)
    log_p, log_q = log_p.clamp(min=floor), log_q.clamp(min=floor)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref ‖ P_model) per position: (B, T, V) twice → (B, T), in nats, never negative."""
    ref_log_probs = F.log_softmax(reference_logits.float(), dim=-1)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return kl_divergence(ref_log_probs, log_probs).clamp(min=0.0)  # tiny negative values are float rounding


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Whether the two models' most likely next tokens agree, per position: (B, T) bool."""
    return reference_logits.argmax(dim=-1) == logits.argmax(dim=-1)


def perplexity(nll_sum: float, count: int) -> float:
    """exp(mean NLL)."""
    return float(torch.exp(torch.tensor(nll_sum / max(count, 1), dtype=torch.float64)))
