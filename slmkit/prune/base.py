"""What the unstructured / N:M pruners share: their config fields, target selection and input checks."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
from torch import nn

from slmkit.config import BaseConfig, ConfigError, LayerwiseFields, check_fraction, check_regexes
from slmkit.errors import SlmkitError
from slmkit.models.arch import block_linears, block_targets, blocks, get_spec, weight_out_in
from slmkit.models.record import get_record
from slmkit.prune.masks import parse_n_m


@dataclasses.dataclass
class SparsityConfig(BaseConfig):
    """Fields of every unstructured / N:M pruner. Give ``sparsity`` *or* ``n_m`` (default: 50%)."""

    category = "prune"

    sparsity: float | None = None  # fraction of each linear's weights set to zero, in [0, 1)
    n_m: str | None = None  # e.g. "2:4": keep N of every M consecutive input weights (sparsity 1 - N/M)
    skip: list[str] = dataclasses.field(default_factory=list)  # regexes of module paths left dense

    def __post_init__(self):
        if self.sparsity is not None and self.n_m is not None:
            raise ConfigError("give sparsity or n_m, not both (n_m fixes the sparsity at 1 - N/M)")
        if self.sparsity is None and self.n_m is None:
            self.sparsity = 0.5
        if self.sparsity is not None:
            check_fraction("sparsity", self.sparsity)
        if self.n_m is not None:
            try:
                parse_n_m(self.n_m)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        check_regexes("skip", self.skip)

    @property
    def pattern(self) -> tuple[int, int] | None:
        """(N, M) when N:M sparsity was asked for, else None."""
        return parse_n_m(self.n_m) if self.n_m else None


@dataclasses.dataclass
class CalibratedSparsityConfig(LayerwiseFields, SparsityConfig):
    """Fields of the pruners that read calibration activations (Wanda, SparseGPT)."""

    def __post_init__(self):
        super().__post_init__()
        self.check_layerwise()


def require_float_linear(module: nn.Module, path: str) -> None:
    """Fail unless ``module`` is a linear with float weights (pruning works before quantization)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise SlmkitError(f"{path} is {type(module).__name__}, not a float linear; prune before quantizing")


def require_float_linears(model: nn.Module) -> None:
    """:func:`require_float_linear` for every linear of every block."""
    for index, block in enumerate(blocks(model)):
        for name, module in block_linears(model, block):
            require_float_linear(module, f"{get_spec(model).layers}.{index}.{name}")


def check_prunable(model: nn.Module, config: SparsityConfig) -> None:
    """Fail before any work if a target is not a float linear or its width does not fit N:M."""
    pattern = config.pattern
    prefix = get_spec(model).layers
    for index, block in enumerate(blocks(model)):
        for name, module in block_targets(model, index, block, config.skip).items():
            require_float_linear(module, f"{prefix}.{index}.{name}")
            columns = weight_out_in(module).shape[1]
            if pattern and columns % pattern[1]:
                raise SlmkitError(
                    f"{config.n_m} sparsity needs in_features divisible by {pattern[1]}, "
                    f"but {prefix}.{index}.{name} has {columns}"
                )


def input_groups(model: nn.Module, targets: dict[str, nn.Module]) -> Iterator[tuple[str, list[str]]]:
    """(representative, members) per activation shared by targets: statistics are computed once each."""
    for group in get_spec(model).input_groups():
        members = [name for name in group if name in targets]
        if members:
            yield members[0], members


def apply_mask(module: nn.Module, mask: torch.Tensor, new_weight: torch.Tensor | None = None) -> None:
    """Zero the masked (out, in) weights of ``module`` in place, first writing ``new_weight`` if given."""
    weight = weight_out_in(module)
    with torch.no_grad():
        if new_weight is not None:
            weight.copy_(new_weight.to(weight.dtype))
        weight.masked_fill_(mask.to(weight.device), 0)


def linear_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of zero weights of every block linear, by module path, plus ``"total"``."""
    spec = get_spec(model)
    result, zeros, total = {}, 0, 0
    for index, block in enumerate(blocks(model)):
        for name, module in block_linears(model, block):
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                continue
            count = int((weight == 0).sum())
            result[f"{spec.layers}.{index}.{name}"] = count / weight.numel()
            zeros, total = zeros + count, total + weight.numel()
    result["total"] = zeros / total if total else 0.0
    return result


def prune_layerwise(model: nn.Module, config: CalibratedSparsityConfig, calib: torch.Tensor, desc: str,
                    reduce, prune_linear, checkpoint=None) -> nn.Module:
    """The walk Wanda and SparseGPT share: per block, one statistic per shared input, then each linear.

    ``reduce`` folds a linear's inputs into a statistic (see :func:`slmkit.calib.observe_inputs`);
    ``prune_linear(module, statistic)`` prunes one linear in place. The pruned block's outputs feed the
    next block. ``checkpoint`` (a :class:`slmkit.calib.WalkCheckpoint`) saves each finished block.
    """
    from slmkit import calib as calibration

    check_prunable(model, config)
    tokens = calibration.cap_length(calib, config.max_seq_len)
    for layer in calibration.layerwise(model, tokens, config.batch_size, config.device, desc=desc,
                                       checkpoint=checkpoint):
        targets = block_targets(model, layer.index, layer.block, config.skip)
        groups = dict(input_groups(model, targets))
        stats = calibration.observe_inputs(layer, {name: targets[name] for name in groups}, reduce)
        for representative, members in groups.items():
            for name in members:
                prune_linear(targets[name], stats[representative])
        del stats
    get_record(model).metrics["sparsity"] = linear_sparsity(model)["total"]
    return model
