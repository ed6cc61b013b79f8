"""Round-to-nearest weight-only quantization (W8A16 / W4A16): no calibration, the baseline GPTQ and AWQ
improve on. Each group's scale comes from its own max |w| (or min/max when asymmetric, with the range
widened where its rounded zero point would clip an end: :attr:`RTNConfig.widen`)."""

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

    # Asymmetric ranges only: the zero point is rounded to an integer, which shifts the grid by up to half
    # a step, so [min, max] / 15 can clip one end. Each (row, group) then picks among its plain range and
    # the range widened by half a step and by a whole one (groupwise.widening) by its own squared weight
    # error: no data, about a second on SmolLM2. Measured there (Shakespeare / python-docs perplexity
    # rise): g64 +27.2% / +30.3% -> +23.7% / +26.1%, g128 +29.0% / +32.2% -> +26.5% / +28.2%, KL lower
    # in both. Symmetric ranges stay max|w| / 7.5: there the same choice lowered perplexity but raised KL
    # on the docs (g64 +43.8% / +44.5% -> +39.1% / +43.2%, KL 0.397 -> 0.406; g128 +59.1% / +54.5% ->
    # +52.7% / +54.4%, KL 0.489 -> 0.492). False: plain min/max ranges (llm-compressor's RTN).
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
            if config.widen and not config.symmetric:  # [1.0] and the widened ratios, by the weight error
                clip = search_clip(weight, None, config.bits, config.group_size, False, max_shrink=0.0, grid=1)
            scale, zero = group_params(weight, config.bits, config.group_size, config.symmetric, clip)
            codes = quantize_codes(weight, scale, zero, config.bits, config.group_size)
            replace_with_weight_only(model, index, block, name, codes, scale, zero, config)
    return model
