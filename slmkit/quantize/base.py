"""What the weight-only quantizers (RTN, GPTQ, AWQ) share: the scheme fields, target selection, the
"quantize once" rule and the swap of a float linear for a :class:`WeightOnlyLinear`."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from slmkit.config import (BaseConfig, ConfigError, LayerwiseFields, check_choice, check_range, check_regexes,
                           check_type, lookup)
from slmkit.errors import SlmkitError
from slmkit.models.arch import block_linears, blocks, get_spec, set_module
from slmkit.models.record import get_record
from slmkit.quantize.linear import WeightOnlyLinear

SCHEMES = {"W4A16": 4, "W8A16": 8}  # weight-only schemes: bits of the weights


def check_group_size(field: str, value) -> None:
    """Raise ConfigError unless ``value`` is None (per channel) or a power of two >= 16."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ConfigError(f"{field} must be a positive power of two >= 16 (e.g. 32, 64, 128) or null for "
                          f"one group per output channel, got {value!r}")


@dataclasses.dataclass
class WeightQuantConfig(BaseConfig):
    """Fields of every weight-only quantizer: the scheme, the grouping and what to leave in float."""

    category = "quantize"

    scheme: str = "W4A16"  # "W4A16" (int4 weights, packed two a byte) or "W8A16"
    group_size: int | None = 128  # input columns per scale; null = one scale per output channel
    symmetric: bool = True  # False adds an int8 zero point per group
    skip: list[str] = dataclasses.field(default_factory=list)  # regexes of module paths kept in float

    def __post_init__(self):
        check_choice("scheme", self.scheme, tuple(SCHEMES))
        check_group_size("group_size", self.group_size)
        check_type("symmetric", self.symmetric, bool)
        check_regexes("skip", self.skip)

    @property
    def bits(self) -> int:
        """Bits per weight code."""
        return SCHEMES[self.scheme]


@dataclasses.dataclass
class CalibratedWeightQuantConfig(LayerwiseFields, WeightQuantConfig):
    """Fields of the quantizers that read calibration activations (GPTQ, AWQ)."""

    # Every search and error compensation scores weight errors through the inputs' Gram matrix XᵀX,
    # pulled this far toward its diagonal first (slmkit.calib.shrink_gram): the inputs' energies stay, the
    # correlations between them, which calibration text of one domain over-fits, are damped. On SmolLM2
    # W4 g64 GPTQ calibrated on Shakespeare, 0.25 took the perplexity rise from +11.9% to +6.3% there and
    # from +24.2% to +15.1% on python-docs (0.1: +5.9% / +17.0%; 0.5: +8.3% / +14.8%); 0 is the plain Gram.
    gram_shrink: float = 0.25

    def __post_init__(self):
        super().__post_init__()
        self.check_layerwise()
        check_range("gram_shrink", self.gram_shrink, 0.0, 1.0)


@dataclasses.dataclass
class ClipSearchFields:
    """Fields of the quantizers that search a clipping ratio per (row, group) of each weight (GPTQ, AWQ).

    Mixed in first (``class C(ClipSearchFields, CalibratedWeightQuantConfig)``); a config may redeclare
    ``max_shrink`` with its own default. Its ``__post_init__`` calls :meth:`check_clip_search`.
    """

    clip: bool = True  # search a clipping ratio per (row, group) of the range
    max_shrink: float = 0.2  # the smallest ratio tried is 1 - max_shrink
    clip_grid: int = 20  # ratios tried
    # Asymmetric only: clip the low and the high end of each range separately, each over clip_grid // 2
    # ratios, every pair tried (100 pairs at the default grid: the search takes 5x as long). Outliers are
    # often on one side of a group. On SmolLM2 W4 g128 asymmetric AWQ calibrated on Shakespeare:
    # +12.6% / +18.6% perplexity (Shakespeare / python-docs) one-sided (with its widening,
    # groupwise.widening) → +11.1% / +17.0%; at g64 worse (+9.6% / +12.8% → +11.1% / +13.8%). A finer
    # grid helps a little: AWQ g128 asymmetric, mixed calibration, +12.9% / +16.2% at clip_grid 20 →
    # +11.8% / +15.8% at 40 (400 pairs; one-sided +13.1% / +16.9%).
    clip_two_sided: bool = False

    def clip_search(self) -> tuple[float, int, bool] | None:
        """(max_shrink, clip_grid, clip_two_sided) of the clipping search, or None when ``clip`` is off."""
        return (self.max_shrink, self.clip_grid, self.clip_two_sided) if self.clip else None

    def check_clip_search(self) -> None:
        """Validate the clipping search fields."""
        check_type("clip", self.clip, bool)
        check_range("max_shrink", self.max_shrink, 0.0, 0.95)
        check_range("clip_grid", self.clip_grid, 1, 1000, int)
        check_type("clip_two_sided", self.clip_two_sided, bool)
        if self.clip and self.max_shrink == 0:
            raise ConfigError("max_shrink must be > 0 when clip is on (or set clip: false)")
        if self.clip_two_sided and (not self.clip or getattr(self, "symmetric", True)):
            raise ConfigError("clip_two_sided needs clip: true and symmetric: false (a symmetric range has one end)")


def require_unquantized(model: nn.Module, what: str) -> None:
    """Refuse a second quantization: every block linear must be float and no quantize step recorded."""
    for step in get_record(model).steps:
        (name, _), = step.items()
        try:
            category = lookup(name).config_class.category
        except ConfigError:
            continue
        if category == "quantize":
            raise SlmkitError(f"{what}: this model is already quantized ({name}); quantizing twice is not "
                              "supported, start again from the float model")
    prefix = get_spec(model).layers
    for index, block in enumerate(blocks(model)):
        for name, module in block_linears(model, block):
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
                raise SlmkitError(f"{what}: {prefix}.{index}.{name} is already quantized "
                                  f"({type(module).__name__}); quantizing twice is not supported")


def replace_with_weight_only(model: nn.Module, index: int, block: nn.Module, name: str, codes: torch.Tensor,
                             scale: torch.Tensor, zero: torch.Tensor | None, config: WeightQuantConfig) -> None:
    """Swap ``block.<name>`` for a WeightOnlyLinear holding ``codes`` and record its layout."""
    old = block.get_submodule(name)
    bias = getattr(old, "bias", None)
    module = WeightOnlyLinear.from_codes(codes, scale, zero, config.bits, config.group_size,
                                         None if bias is None else bias.detach())
    set_module(block, name, module)
    get_record(model).modules[f"{get_spec(model).layers}.{index}.{name}"] = module.layout()
