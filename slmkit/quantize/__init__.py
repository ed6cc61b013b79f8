"""Quantization transforms: ``slmkit.quantize(model, Config, calib=...)``.

Available configs: :class:`SmoothQuantConfig` (W8A8). Modules: ``linear`` (int8 math, W8A8Linear),
``smoothquant``.
"""

from __future__ import annotations

from slmkit.config import BaseConfig, apply_step
from slmkit.quantize.linear import W8A8Linear
from slmkit.quantize.smoothquant import SmoothQuantConfig


def quantize(model, config: BaseConfig, calib=None):
    """Quantize ``model`` in place as ``config`` says and return it.

    Args:
        model: a model from ``slmkit.load_model``.
        config: a quantization config, e.g. ``SmoothQuantConfig(alpha=0.5)``.
        calib: calibration token ids (num_blocks, block_len) from ``slmkit.calib_data``; ``None`` uses
            128 blocks of 512 tokens of the embedded corpus's calibration split.

    Example:
        >>> slmkit.quantize(model, SmoothQuantConfig(alpha=0.5), calib=slmkit.calib_data(model, n=64))
    """
    return apply_step(model, config, calib, category="quantize")


__all__ = ["quantize", "SmoothQuantConfig", "W8A8Linear"]
