"""OpenELM-style layer-wise scaling (Mehta et al., 2024) applied to a pretrained checkpoint.

OpenELM gives block i of N (t = i / (N − 1)) the widths

    heads_i = alpha_i · hidden_size / head_dim,   alpha_i = alpha_min + (alpha_max − alpha_min) · t
    ffn_i   = beta_i · hidden_size,               beta_i  = beta_min  + (beta_max  − beta_min)  · t

so early blocks are narrow and late blocks wide, and trains that design from scratch. slmkit reaches it
from a pretrained model by structured pruning per block: heads (in whole GQA groups by default) and FFN
channels are ranked by activation importance (Minitron) and the weakest are cut. Heads round to whole
key/value groups, FFN widths to ``multiple_of``. Pruning only shrinks, so a schedule asking a block for
more than it has is refused. With ``param_budget`` the beta range is scaled (its shape kept) to the
largest schedule that fits the budget, so schedules can be compared with uniform pruning at equal size;
there, widths the scaled range puts above a block's own are clipped to it (OpenELM's 0.5..4 range on
SmolLM2, whose FFNs are 2.67 × hidden, clips the last blocks).

The result is an :class:`slmkit.SlmForCausalLM` (per-layer head counts and FFN widths).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from slmkit.config import BaseConfig, ConfigError, check_choice, check_range, check_type, register
from slmkit.errors import SlmkitError
from slmkit.eval.report import parameter_count
from slmkit.models.arch import attention_shape, blocks, intermediate_size
from slmkit.models.record import get_record
from slmkit.prune.structured import (WidthPlan, apply_width_plan, check_param_budget, config_params,
                                     planned_params, pruned_config, width_scores)
from slmkit.transforms.base import require_dense_llama, require_transformable


@dataclasses.dataclass
class LayerwiseScalingConfig(BaseConfig):
    """OpenELM's per-block head and FFN schedule; defaults are OpenELM's ranges."""

    name = "layerwise_scaling"
    category = "transform"

    alpha_min: float = 0.5  # heads of the first block = alpha_min · hidden_size / head_dim
    alpha_max: float = 1.0  # heads of the last block (linear in between)
    beta_min: float = 0.5  # FFN width of the first block = beta_min · hidden_size
    beta_max: float = 4.0  # FFN width of the last block
    # Parameters to keep, as a fraction of the model's (0 < b < 1) or a count (b > 1): the beta range is
    # scaled by one factor (its min/max ratio kept) to the largest schedule within the budget; widths
    # above a pretrained block's own are clipped to it.
    param_budget: float | None = None
    head_unit: str = "group"  # "group": whole key/value groups; "query": query heads within every group
    multiple_of: int = 64  # FFN widths are rounded to a multiple of this
    # "activation" (Minitron) or "taylor" (first-order, one backward pass per sequence, needs gradients);
    # activation kept more quality on SmolLM2 (benchmarks/results/cpu/smollm2-pruning-comparison.md)
    importance: str = "activation"
    batch_size: int = 8  # sequences per forward pass (Taylor: one at a time, kept per batch)
    max_seq_len: int = 2048
    device: str | None = None

    def __post_init__(self):
        for low, high in (("alpha_min", "alpha_max"), ("beta_min", "beta_max")):
            check_range(low, getattr(self, low), 0.0, 1e6)
            check_range(high, getattr(self, high), 0.0, 1e6)
            if not 0 < getattr(self, low) <= getattr(self, high):
                raise ConfigError(f"need 0 < {low} <= {high}, got {getattr(self, low)} and {getattr(self, high)}")
        check_param_budget(self.param_budget)
        check_choice("head_unit", self.head_unit, ("group", "query"))
        check_range("multiple_of", self.multiple_of, 1, 65536, int)
        check_choice("importance", self.importance, ("activation", "taylor"))
        check_range("batch_size", self.batch_size, 1, 65536, int)
        check_range("max_seq_len", self.max_seq_len, 16, 1 << 20, int)
        if self.device is not None:
            check_type("device", self.device, str)


def linear_schedule(low: float, high: float, num_layers: int) -> list[float]:
    """``low`` at the first block to ``high`` at the last, linearly (OpenELM's alpha / beta per block)."""
    if num_layers == 1:
        return [low]
    return [low + (high - low) * index / (num_layers - 1) for index in range(num_layers)]


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def schedule_plan(config, scaling: LayerwiseScalingConfig, beta_scale: float = 1.0,
                  clip_ffn: bool = False) -> WidthPlan:
    """Per-block kept heads, key/value heads and FFN widths of the schedule, for a model with ``config``.

    ``clip_ffn``: FFN widths above a block's current width are clipped to it. Errors (before any work) if
    a block would get no head or no FFN channel.
    """
    hidden = config.hidden_size
    num_layers = config.num_hidden_layers
    alphas = linear_schedule(scaling.alpha_min, scaling.alpha_max, num_layers)
    betas = linear_schedule(scaling.beta_min * beta_scale, scaling.beta_max * beta_scale, num_layers)
    plan = WidthPlan([], [], [], hidden)
    for index, (alpha, beta) in enumerate(zip(alphas, betas)):
        shape = attention_shape(config, index)
        group = shape.num_heads // shape.num_kv_heads
        target = alpha * hidden / shape.head_dim  # heads OpenELM would give this block
        if scaling.head_unit == "group" or group == 1:
            kv = _round_half_up(target / group)
            heads = kv * group
        else:
            kv = shape.num_kv_heads
            heads = _round_half_up(target / kv) * kv
        if heads < 1:
            raise SlmkitError(f"layer {index}: alpha {alpha:.3g} gives {target:.2f} heads, which rounds to no "
                              f"head (in units of {group if scaling.head_unit == 'group' else kv}); raise alpha_min")
        ffn = _round_half_up(beta * hidden / scaling.multiple_of) * scaling.multiple_of
        if ffn < 1:
            raise SlmkitError(f"layer {index}: beta {beta:.3g} gives {beta * hidden:.0f} FFN channels, which rounds "
                              f"to none at multiple_of {scaling.multiple_of}; raise beta_min")
        if clip_ffn:
            ffn = min(ffn, intermediate_size(config, index))
        plan.heads.append(heads)
        plan.kv_heads.append(kv)
        plan.ffn.append(ffn)
    return plan


def _check_shrinks(config, plan: WidthPlan) -> None:
    """Pruning cannot add heads or channels: every block's planned widths must fit in what it has."""
    for index in range(config.num_hidden_layers):
        shape = attention_shape(config, index)
        if plan.heads[index] > shape.num_heads or plan.kv_heads[index] > shape.num_kv_heads:
            raise SlmkitError(f"layer {index} would get {plan.heads[index]} heads ({plan.kv_heads[index]} key/value) "
                              f"but has {shape.num_heads} ({shape.num_kv_heads}); layer-wise scaling of a pretrained "
                              f"model only prunes: lower alpha_max to <= {shape.num_heads * shape.head_dim / config.hidden_size:.3g}")
        width = intermediate_size(config, index)
        if plan.ffn[index] > width:
            raise SlmkitError(f"layer {index} would get {plan.ffn[index]} FFN channels but has {width}; layer-wise "
                              f"scaling of a pretrained model only prunes: lower beta_max to <= "
                              f"{width / config.hidden_size:.3g} or give param_budget")


def solve_plan(config, scaling: LayerwiseScalingConfig, shrink_only: bool) -> tuple[WidthPlan, float]:
    """(plan, beta scale): the schedule as given, or with the beta range scaled to meet ``param_budget``.

    ``shrink_only``: the plan must fit inside ``config``'s widths (pruning a pretrained model).
    """
    if scaling.param_budget is None:
        plan = schedule_plan(config, scaling)
        if shrink_only:
            _check_shrinks(config, plan)
        return plan, 1.0
    total = config_params(config)
    budget = scaling.param_budget * total if scaling.param_budget < 1 else scaling.param_budget
    if shrink_only and budget >= total:
        raise SlmkitError(f"param_budget {scaling.param_budget:g} is not below the model's {total:,} parameters")
    betas = linear_schedule(scaling.beta_min, scaling.beta_max, config.num_hidden_layers)
    high = 8.0  # a fresh model may grow up to 8x the beta range
    if shrink_only:  # widths are clipped to each block's own; past this scale every block is at its own
        high = max(intermediate_size(config, i) / (b * config.hidden_size) for i, b in enumerate(betas))

    def params_at(scale: float) -> float:
        try:
            plan = schedule_plan(config, scaling, scale, clip_ffn=shrink_only)
        except SlmkitError:
            return math.inf
        return planned_params(config, plan, per_layer=True)

    def fits(scale: float) -> bool:
        return params_at(scale) <= budget

    if fits(high):
        scale = high
    else:
        low = 0.0
        for _ in range(30):  # bisection: parameters grow with the scale
            mid = (low + high) / 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        scale = low
        if scale == 0.0 or not fits(scale):
            raise SlmkitError(f"param_budget {budget:,.0f} cannot be reached: even the narrowest FFN schedule with "
                              f"heads alpha {scaling.alpha_min:g}..{scaling.alpha_max:g} keeps more; lower "
                              "alpha_min / alpha_max (or multiple_of)")
    plan = schedule_plan(config, scaling, scale, clip_ffn=shrink_only)
    if shrink_only:
        _check_shrinks(config, plan)  # heads
    return plan, scale


def design_config(base_config, scaling: LayerwiseScalingConfig):
    """The SlmConfig of a fresh model in this design, from a base config (hidden size, heads, depth)."""
    require_dense_llama(base_config, "layer-wise scaling")
    plan, _ = solve_plan(base_config, scaling, shrink_only=False)
    return pruned_config(base_config, plan, per_layer=True)


@register(LayerwiseScalingConfig, needs_calibration=True, resumable=True)
def scale_layerwise(model: nn.Module, config: LayerwiseScalingConfig, calib: torch.Tensor,
                    checkpoint=None) -> nn.Module:
    """Prune ``model`` in place to OpenELM's per-block head and FFN schedule (activation importance).

    ``checkpoint`` (a :class:`slmkit.calib.WalkCheckpoint`): the importance walk resumes from it."""
    require_transformable(model, "layer-wise scaling")
    plan, scale = solve_plan(model.config, config, shrink_only=True)
    before = parameter_count(model)
    own_ffn = [intermediate_size(model.config, i) for i in range(len(blocks(model)))]
    apply_width_plan(model, plan, width_scores(model, calib, config, checkpoint), per_layer=True)
    get_record(model).metrics["layerwise_scaling"] = {
        "heads": plan.heads, "kv_heads": plan.kv_heads, "ffn": plan.ffn, "beta_scale": round(scale, 6),
        "blocks_at_own_ffn_width": sum(w == own for w, own in zip(plan.ffn, own_ffn)),
        "params_before": before, "params_after": parameter_count(model), "blocks": len(blocks(model)),
    }
    return model
