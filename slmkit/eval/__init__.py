"""Evaluation: perplexity, KL / top-1 agreement against a reference, size and memory."""

from slmkit.eval.evaluate import EvalConfig, evaluate
from slmkit.eval.report import EvalReport

__all__ = ["EvalConfig", "EvalReport", "evaluate"]
