"""Architecture transforms: ``slmkit.transform(model, Config, calib=...)``.

- :class:`SharedFFNConfig`: MobiLLaMA-style FFN sharing across blocks (or groups of consecutive blocks),
  initialised from the pretrained FFNs, with optional per-block low-rank corrections.
- :class:`LayerwiseScalingConfig`: OpenELM-style per-block head counts and FFN widths, reached by
  structured pruning of the pretrained blocks (or solved from a parameter budget).

Both turn a Llama-architecture model into an :class:`slmkit.SlmForCausalLM`; heal the result with
``slmkit.distill`` from the original. :func:`build_model` makes a fresh, randomly initialised model in
either design for pretraining.
"""

from __future__ import annotations

import torch

from slmkit.config import BaseConfig, ConfigError, apply_step
from slmkit.errors import SlmkitError, first_line
from slmkit.transforms.layerwise_scaling import LayerwiseScalingConfig
from slmkit.transforms.layerwise_scaling import design_config as _layerwise_design
from slmkit.transforms.shared_ffn import SharedFFNConfig
from slmkit.transforms.shared_ffn import design_config as _shared_design

_DESIGNS = {SharedFFNConfig: _shared_design, LayerwiseScalingConfig: _layerwise_design}


def transform(model, config: BaseConfig, calib=None, checkpoint_dir=None):
    """Apply an architecture transform to ``model`` in place and return it.

    Args:
        model: a Llama-architecture model from ``slmkit.load_model`` (e.g. the embedded SmolLM2).
        config: ``SharedFFNConfig(...)`` or ``LayerwiseScalingConfig(...)``.
        calib: calibration token ids (num_blocks, block_len) from ``slmkit.calib_data``; ``None`` uses the
            embedded corpus's calibration split.
        checkpoint_dir: a directory where the transform keeps its finished work (the importance scores
            per block, or per batch for Taylor; each shared-FFN group's merged weights) and the walk's hidden
            states after a recent block. Calling again with the same arguments on the model loaded afresh
            resumes an interrupted run; the same work gives the same result. Refused if it holds another
            run's work.

    Example:
        >>> slmkit.transform(model, SharedFFNConfig(group_size=2, init="merge"))
        >>> slmkit.transform(model, LayerwiseScalingConfig(alpha_min=0.67, beta_min=1.0, beta_max=2.67))
        >>> slmkit.transform(model, SharedFFNConfig(group_size=2), checkpoint_dir="out/share.work")  # resumable
    """
    return apply_step(model, config, calib, category="transform", checkpoint_dir=checkpoint_dir)


def build_model(base, config: BaseConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A fresh, randomly initialised :class:`slmkit.SlmForCausalLM` in a transform's design, for pretraining.

    Args:
        base: the model to take sizes from (hidden size, heads, depth, vocabulary): a transformers config,
            or anything ``AutoConfig.from_pretrained`` reads (a hub id or a local directory).
        config: ``SharedFFNConfig`` (only ``group_size`` and ``rank`` matter) or ``LayerwiseScalingConfig``
            (the schedule is applied to ``base``'s sizes; widths may exceed them; ``param_budget`` is
            relative to ``base``'s parameter count).
        seed: seed of the weight initialisation.
        dtype: parameter dtype.

    Example:
        >>> model = slmkit.build_model("HuggingFaceTB/SmolLM2-135M", LayerwiseScalingConfig(param_budget=0.8))
    """
    from transformers import AutoConfig, PretrainedConfig

    from slmkit.models.modeling import SlmForCausalLM

    design = next((fn for kind, fn in _DESIGNS.items() if isinstance(config, kind)), None)
    if design is None:
        raise ConfigError(f"build_model takes SharedFFNConfig or LayerwiseScalingConfig, got {type(config).__name__}")
    if not isinstance(base, PretrainedConfig):
        try:
            base = AutoConfig.from_pretrained(base)
        except (OSError, ValueError) as error:
            raise SlmkitError(f"cannot read a model config from {base!r} ({first_line(error)})") from None
    slm_config = design(base, config)
    torch.manual_seed(seed)
    return SlmForCausalLM(slm_config).to(dtype)  # in training mode, ready to pretrain


__all__ = ["LayerwiseScalingConfig", "SharedFFNConfig", "build_model", "transform"]
