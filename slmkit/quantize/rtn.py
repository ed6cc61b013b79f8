"""Round-to-nearest weight-only quantization (W8A16 / W4A16): no calibration, the baseline GPTQ and AWQ
improve on. Each group's scale comes from its own max |w| (or min/max when asymmetric)."""

from __future__ import annotations

import dataclasses

from torch import nn
from tqdm.auto import tqdm

from slmkit.config import register
from slmkit.models.arch import block_targets, blocks, weight_out_in
from slmkit.quantize.base import WeightQuantConfig, replace_with_weight_only, require_unquantized
from slmkit.quantize.groupwise import group_params, quantize_codes


@dataclasses.dataclass
class RTNConfig(WeightQuantConfig):
    """Round-to-nearest weight-only quantization: ``RTNConfig(scheme="W4A16", group_size=128)``."""

    name = "rtn"


@register(RTNConfig)
def rtn(model: nn.Module, config: RTNConfig) -> nn.Module:
    """Quantize every block linear of ``model`` (except ``config.skip``) to integer weights, in place."""
    require_unquantized(model, "rtn")
    for index, block in enumerate(tqdm(blocks(model), desc="rtn", unit="block")):
        for name, module in block_targets(model, index, block, config.skip).items():
            weight = weight_out_in(module)
            scale, zero = group_params(weight, config.bits, config.group_size, config.symmetric)
            codes = quantize_codes(weight, scale, zero, config.bits, config.group_size)
            replace_with_weight_only(model, index, block, name, codes, scale, zero, config)
    return model
