"""Wanda (Sun et al., 2023, https://arxiv.org/abs/2306.11695): prune by |W| · ‖X‖ within each output row.

No weight update, one calibration pass. Blocks are walked with :func:`slmkit.calib.layerwise`, so only
one block and its (length-capped) activations are on the device at a time.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from slmkit import calib as calibration
from slmkit.config import register
from slmkit.models.arch import weight_out_in
from slmkit.prune.base import CalibratedSparsityConfig, apply_mask, prune_layerwise
from slmkit.prune.masks import n_m_mask, unstructured_mask, wanda_scores


@dataclasses.dataclass
class WandaConfig(CalibratedSparsityConfig):
    """Wanda pruning: weights compared per output row (unstructured) or per group of M (N:M)."""

    name = "wanda"


@register(WandaConfig, needs_calibration=True, resumable=True)
def wanda(model: nn.Module, config: WandaConfig, calib: torch.Tensor,
          checkpoint: calibration.WalkCheckpoint | None = None) -> nn.Module:
    """Prune every block linear of ``model`` in place by Wanda importance on ``calib`` tokens.

    With a ``checkpoint``, each finished block is saved and an interrupted run resumes after the last one.
    """
    pattern = config.pattern

    def prune_linear(module: nn.Module, input_sq_sum: torch.Tensor) -> None:
        scores = wanda_scores(weight_out_in(module), input_sq_sum)
        mask = n_m_mask(scores, *pattern) if pattern else unstructured_mask(scores, config.sparsity, per_row=True)
        apply_mask(module, mask)

    return prune_layerwise(model, config, calib, "wanda", calibration.sq_sum_reduce, prune_linear, checkpoint)
