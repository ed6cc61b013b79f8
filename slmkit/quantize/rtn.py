"""Round-to-nearest weight-only quantization (W8A16 / W4A16): no calibration, the baseline GPTQ and AWQ
improve on. Each group's scale comes from its own max |w| (or min/max when asymmetric), the range widened
where that clips an end and the weight error says so (:attr:`RTNConfig.widen`)."""

from __future__ import annotations

import dataclasses

from torch import nn
from tqdm.auto import tqdm

from slmkit.config import check_type, register
from slmkit.models.arch import block_targets, blocks, weight_out_in
from slmkit.quantize.base import WeightQuantConfig, replace_with_weight_only, require_unquantized
from slmkit.quantize.groupwise import group_params, quantize_codes, search_clip


@dataclasses.dataclass
class RTNConfig(WeightQuantConfig):
    """Round-to-nearest weight-only quantization: ``RTNConfig(scheme="W4A16", group_size=128)``."""

    name = "rtn"

    # A range as computed clips one end by up to half a step: symmetric, max|w| / 7.5 leaves a positive
    # maximum half a step short of code 7; asymmetric, the zero point is rounded to an integer, which
    # shifts the grid by up to half a step. Each (row, group) picks among its plain range and the ranges
    # widened halfway and all the way to room for that end (groupwise.widening) by its own squared weight
    # error: no data, about a second on SmolLM2. Measured there (Shakespeare / python-docs perplexity
    # rise, KL): W4 g64 asymmetric +27.2% / +30.3% -> +23.7% / +26.1% (KL 0.311 / 0.286 -> 0.289 /
    # 0.262), g128 asymmetric +29.0% / +32.2% -> +26.5% / +28.2%; W8 per channel +0.99% / +0.37% ->
    # +0.79% / +0.23% (KL 0.0036 / 0.0029 -> 0.0032 / 0.0028); W4 symmetric: perplexity lower, KL on
    # the docs slightly higher (g64 +43.8% / +44.5% -> +39.1% / +43.2%, KL 0.397 -> 0.406; g128 +59.1% /
    # +54.5% -> +52.7% / +54.4%, KL 0.489 -> 0.492). False: plain ranges (as llm-compressor's RTN).
    widen: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_type("widen", self.widen, bool)


@register(RTNConfig)
def rtn(model: nn.Module, config: RTNConfig) -> nn.Module:
    """Quantize every block linear of ``model`` (except ``config.skip``) to integer weights, in place."""
    require_unquantized(model, "rtn")
    for index, block in enumerate(tqdm(blocks(model), desc="rtn", unit="block")):
        for name, module in block_targets(model, index, block, config.skip).items():
            weight = weight_out_in(module)
            clip = 1.0
            if config.widen:  # the plain range (ratio 1) and the widened ones, by the weight error
                clip = search_clip(weight, None, config.bits, config.group_size, config.symmetric,
                                   max_shrink=0.0, grid=1)
            scale, zero = group_params(weight, config.bits, config.group_size, config.symmetric, clip)
            codes = quantize_codes(weight, scale, zero, config.bits, config.group_size)
            replace_with_weight_only(model, index, block, name, codes, scale, zero, config)
    return model
