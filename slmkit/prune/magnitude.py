"""Magnitude pruning: zero the smallest |W| of each linear (the baseline Wanda and SparseGPT beat)."""

from __future__ import annotations

import dataclasses

from torch import nn
from tqdm.auto import tqdm

from slmkit.config import register
from slmkit.models.arch import block_targets, blocks, weight_out_in
from slmkit.models.record import get_record
from slmkit.prune.base import SparsityConfig, apply_mask, check_prunable, linear_sparsity
from slmkit.prune.masks import magnitude_scores, n_m_mask, unstructured_mask


@dataclasses.dataclass
class MagnitudePruneConfig(SparsityConfig):
    """Magnitude pruning. Unstructured sparsity compares weights over the whole matrix of each linear."""

    name = "magnitude"


@register(MagnitudePruneConfig)
def magnitude(model: nn.Module, config: MagnitudePruneConfig) -> nn.Module:
    """Zero the lowest-|W| weights of every block linear in place (no calibration data needed)."""
    check_prunable(model, config)
    pattern = config.pattern
    for index, block in enumerate(tqdm(blocks(model), desc="magnitude", unit="block")):
        for module in block_targets(model, index, block, config.skip).values():
            scores = magnitude_scores(weight_out_in(module))
            mask = n_m_mask(scores, *pattern) if pattern else unstructured_mask(scores, config.sparsity, per_row=False)
            apply_mask(module, mask)
    get_record(model).metrics["sparsity"] = linear_sparsity(model)["total"]
    return model
