"""Quantization transforms: ``slmkit.quantize(model, Config, calib=...)``.

Configs: :class:`SmoothQuantConfig` (W8A8: int8 weights and activations), and the weight-only
(W8A16 / W4A16) :class:`RTNConfig`, :class:`GPTQConfig` and :class:`AWQConfig`. Modules: ``linear``
(W8A8Linear, WeightOnlyLinear), ``groupwise`` (group-wise int math and int4 packing), ``smoothquant``,
``rtn``, ``gptq``, ``awq``, ``export`` (compressed-tensors for vLLM).
"""

from __future__ import annotations

from slmkit.config import BaseConfig, apply_step
from slmkit.quantize.awq import AWQConfig
from slmkit.quantize.export import export
from slmkit.quantize.gptq import GPTQConfig
from slmkit.quantize.linear import W8A8Linear, WeightOnlyLinear
from slmkit.quantize.rtn import RTNConfig
from slmkit.quantize.smoothquant import SmoothQuantConfig


def quantize(model, config: BaseConfig, calib=None, checkpoint_dir=None):
    """Quantize ``model`` in place as ``config`` says and return it. A model is quantized once.

    Args:
        model: a model from ``slmkit.load_model`` (float, possibly pruned).
        config: a quantization config, e.g. ``SmoothQuantConfig(alpha=0.5)`` or
            ``GPTQConfig(scheme="W4A16", group_size=128)``.
        calib: calibration token ids (num_blocks, block_len) from ``slmkit.calib_data``; ``None`` uses
            128 blocks of 512 tokens of the embedded corpus's calibration split (RTN reads none).
        checkpoint_dir: for the methods that walk the model block by block (SmoothQuant, GPTQ, AWQ), a
            directory where each finished block is saved. After a crash or Ctrl-C, the same call on the
            model loaded again resumes after the last finished block, with the same result.

    Example:
        >>> slmkit.quantize(model, SmoothQuantConfig(alpha=0.5), calib=slmkit.calib_data(model, n=64))
        >>> slmkit.quantize(model, AWQConfig(scheme="W4A16", group_size=64))
        >>> slmkit.quantize(model, GPTQConfig(), calib=calib, checkpoint_dir="out/gptq.blocks")  # resumable
    """
    return apply_step(model, config, calib, category="quantize", checkpoint_dir=checkpoint_dir)


__all__ = ["quantize", "export", "SmoothQuantConfig", "RTNConfig", "GPTQConfig", "AWQConfig", "W8A8Linear",
           "WeightOnlyLinear"]
