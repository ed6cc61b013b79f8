"""Pure metric functions on logits (no model walking).

For a window of T tokens the model predicts tokens 1..T-1 from logits 0..T-2.
KL is measured per predicted token as KL(P_reference ‖ P_model) = Σ p_ref (log p_ref − log p_model),
the divergence of the compressed model from the original (in nats).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each next token: logits (B, T, V), tokens (B, T) → (B, T-1)."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    return -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref ‖ P_model) per position: (B, T, V) twice → (B, T), in nats, never negative."""
    ref_log_probs = F.log_softmax(reference_logits.float(), dim=-1)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(dim=-1)
    return kl.clamp(min=0.0)  # tiny negative values are float rounding


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Whether the two models' most likely next tokens agree, per position: (B, T) bool."""
    return reference_logits.argmax(dim=-1) == logits.argmax(dim=-1)


def perplexity(nll_sum: float, count: int) -> float:
    """exp(mean NLL)."""
    return float(torch.exp(torch.tensor(nll_sum / max(count, 1), dtype=torch.float64)))
