"""Per-request sampling settings and the pure tensor functions that turn logits into tokens.

Each request carries its own :class:`SamplingParams` and its own ``torch.Generator`` (seeded from
``seed``), so a request samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import dataclasses

import torch

from slmkit.config import BaseConfig, ConfigError, check_type


@dataclasses.dataclass
class SamplingParams(BaseConfig):
    """How one request picks its tokens and when it stops.

    Args:
        max_tokens: new tokens at most (finish reason ``length``).
        temperature: 0 is greedy (argmax); above 0 samples from softmax(logits / temperature).
        top_k: keep the k most likely tokens before sampling (0: all).
        top_p: keep the smallest set of tokens whose probability reaches top_p (1.0: all).
        repetition_penalty: CTRL-style penalty (as HF ``generate``): logits of tokens already in the prompt
            or output are divided by it when positive, multiplied when negative. 1.0 is off.
        stop: strings that end the request (finish reason ``stop``); the text is cut before the match.
        stop_token_ids: token ids that end the request besides the model's end-of-sequence tokens.
        ignore_eos: keep generating past end-of-sequence tokens (benchmarks use it for fixed lengths).
        seed: per-request sampling seed; None draws one from the engine's seed.
    """

    name = "sampling"

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise ConfigError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop)
        for field in ("max_tokens", "top_k"):
            check_type(field, getattr(self, field), int)
        for field in ("temperature", "top_p", "repetition_penalty"):
            check_type(field, getattr(self, field), (int, float))
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise ConfigError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        check_type("ignore_eos", self.ignore_eos, bool)
        if self.seed is not None:
            check_type("seed", self.seed, int)
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 keeps all tokens), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1.0 is off), got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        """True when the request decodes by argmax."""
        return self.temperature == 0.0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL repetition penalty on (B, V) ``logits``: ``seen`` (B, V) bool marks tokens already present.

    ``penalty`` (B,) is 1.0 for rows without one. Returns a new tensor.
    """
    factor = penalty[:, None].to(logits.dtype)
    penalized = torch.where(logits > 0, logits / factor, logits * factor)
    return torch.where(seen, penalized, logits)


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the logits outside each row's top-k and top-p (nucleus) sets.

    ``top_k`` (B,) int (0 keeps all), ``top_p`` (B,) float (1.0 keeps all). The most likely token always
    stays. Returns a new (B, V) tensor.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    filtered_sorted = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, filtered_sorted)


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                  seen: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of (B, V) float ``logits`` under each row's params → (B,) int64.

    ``seen`` (B, V) bool is needed when any row has a repetition penalty. Greedy rows take the argmax;
    sampled rows draw with their own generator.
    """
    logits = logits.float()
    device = logits.device
    if seen is not None and any(p.repetition_penalty != 1.0 for p in params):
        penalties = torch.tensor([p.repetition_penalty for p in params], device=device)
        logits = apply_repetition_penalty(logits, seen, penalties)
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=device)
        temperature = torch.tensor([params[i].temperature for i in sampled], device=device)
        top_k = torch.tensor([params[i].top_k for i in sampled], device=device)
        top_p = torch.tensor([params[i].top_p for i in sampled], device=device)
        probs = top_k_top_p_filter(logits[rows] / temperature[:, None], top_k, top_p).softmax(dim=-1)
        for row, i in enumerate(sampled):
            tokens[i] = torch.multinomial(probs[row], 1, generator=generators[i])[0]
    return tokens
