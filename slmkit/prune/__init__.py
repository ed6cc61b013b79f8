"""Pruning transforms: ``slmkit.prune(model, Config, calib=...)``.

Unstructured and N:M (2:4, 4:8) sparsity: :class:`MagnitudePruneConfig`, :class:`WandaConfig`,
:class:`SparseGPTConfig`. Sparse weights are stored compressed in checkpoints (values + bitmask) and,
on CUDA, 2:4 linears can run on sparse tensor cores (:func:`to_semi_structured`).

Structured pruning that outputs a genuinely smaller dense model: :class:`WidthPruneConfig` (heads, FFN
channels, hidden size) and :class:`DepthPruneConfig` (whole blocks).
"""

from __future__ import annotations

from slmkit.config import BaseConfig, apply_step
from slmkit.prune.base import linear_sparsity
from slmkit.prune.magnitude import MagnitudePruneConfig
from slmkit.prune.semi_structured import to_semi_structured
from slmkit.prune.sparsegpt import SparseGPTConfig
from slmkit.prune.structured import DepthPruneConfig, WidthPruneConfig
from slmkit.prune.wanda import WandaConfig


def prune(model, config: BaseConfig, calib=None, checkpoint_dir=None):
    """Prune ``model`` in place as ``config`` says and return it.

    Args:
        model: a model from ``slmkit.load_model``.
        config: a pruning config, e.g. ``WandaConfig(sparsity=0.5)``, ``SparseGPTConfig(n_m="2:4")``,
            ``WidthPruneConfig(ffn=0.25)`` or ``DepthPruneConfig(ratio=0.1)``.
        calib: calibration token ids (num_blocks, block_len) from ``slmkit.calib_data``; ``None`` uses the
            embedded corpus's calibration split for the methods that need activations.
        checkpoint_dir: a directory where the finished work is kept: Wanda and SparseGPT (which walk the
            model block by block) save each finished block; width pruning and depth pruning save each
            block's scores (Taylor importance: each batch's). After a crash or Ctrl-C, the same call on the
            model loaded again resumes after the last finished block, with the same result.

    Example:
        >>> slmkit.prune(model, SparseGPTConfig(n_m="2:4"), calib=slmkit.calib_data(model, n=128))
    """
    return apply_step(model, config, calib, category="prune", checkpoint_dir=checkpoint_dir)


__all__ = [
    "DepthPruneConfig",
    "MagnitudePruneConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "WidthPruneConfig",
    "linear_sparsity",
    "prune",
    "to_semi_structured",
]
