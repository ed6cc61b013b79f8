"""Structured pruning that outputs a genuinely smaller dense model: width (heads, FFN, hidden) and depth.

Width (:class:`WidthPruneConfig`): structures are ranked by importance (:mod:`slmkit.prune.importance`)
and the least important are cut out of the weight matrices, so every linear, norm and embedding shrinks
and the config says the new sizes. With ``per_layer: false`` (default) every layer keeps the same widths
and the result is the original transformers architecture (``AutoModelForCausalLM.from_pretrained``
loads it with no slmkit code). With ``per_layer: true`` heads and FFN channels are ranked across layers,
widths differ per layer and a Llama model becomes :class:`slmkit.models.modeling.SlmForCausalLM`.

Heads under GQA: ``head_unit: query`` removes the same number of query heads from every key/value group
(the KV cache keeps its size; group sizes stay equal); ``head_unit: group`` removes whole key/value
groups with their query heads (the KV cache shrinks too). Multi-head attention always removes heads
with their key/value heads.

Depth (:class:`DepthPruneConfig`): whole blocks are dropped, chosen by block influence or by how much
the calibration loss rises when each block is skipped.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch import nn

from slmkit import calib as calibration
from slmkit.config import BaseConfig, ConfigError, check_choice, check_fraction, check_range, check_type, register
from slmkit.errors import SlmkitError
from slmkit.eval.report import parameter_count
from slmkit.models.arch import (attention_shape, blocks, get_module, get_spec, intermediate_size,
                                set_module, weight_out_in)
from slmkit.models.modeling import SLM_SOURCE_TYPES, become_slm, set_model_config, to_slm_config
from slmkit.models.record import get_record
from slmkit.prune import importance
from slmkit.prune.base import require_float_linears

WIDTH_DIMS = ("heads", "ffn", "hidden")


def check_param_budget(value: float | None) -> None:
    """Raise ConfigError unless ``value`` is None, a fraction in (0, 1) or a parameter count > 1."""
    if value is not None:
        check_range("param_budget", value, 0.0, float("inf"))
        if value <= 0 or value == 1:
            raise ConfigError(f"param_budget must be a fraction in (0, 1) or a parameter count > 1, got {value!r}")


@dataclasses.dataclass
class WidthPruneConfig(BaseConfig):
    """Width pruning: fractions removed per dimension, or a total parameter budget."""

    name = "width"
    category = "prune"

    heads: float = 0.0  # fraction of attention heads removed (rounded to whole heads per group)
    ffn: float = 0.0  # fraction of FFN channels removed
    hidden: float = 0.0  # fraction of hidden (embedding) channels removed
    # Instead of fractions: parameters to keep, as a fraction of the model's (0 < b < 1) or a count (b > 1).
    # The same fraction is then removed from each of ``budget_dims`` the family supports, the smallest
    # that meets the budget; what rounding to whole heads and divisible widths overshot is given back,
    # FFN first (``plan_for_budget``). FFN only is the default: on SmolLM2 at 90% of the parameters it kept
    # perplexity at +22% where heads + FFN + hidden gave +160% (benchmarks/results/cpu).
    param_budget: float | None = None
    budget_dims: list[str] = dataclasses.field(default_factory=lambda: ["ffn"])
    # "activation" (Minitron) or "taylor" (first-order, one backward pass per sequence, needs gradients);
    # activation kept more quality on SmolLM2 (benchmarks/results/cpu/smollm2-pruning-comparison.md)
    importance: str = "activation"
    head_unit: str = "query"  # "query" (heads within GQA groups) or "group" (whole key/value groups)
    per_layer: bool = False  # rank heads / FFN channels across layers: per-layer widths (SlmForCausalLM)
    multiple_of: int = 8  # kept FFN / hidden widths are rounded to the nearest multiple of this
    batch_size: int = 8  # sequences per forward pass (Taylor: one at a time, kept per batch)
    max_seq_len: int = 2048
    device: str | None = None

    def __post_init__(self):
        for field in WIDTH_DIMS:
            check_fraction(field, getattr(self, field), f" (that would remove every {field} unit)")
        check_param_budget(self.param_budget)
        if self.param_budget is not None:
            if any(getattr(self, field) for field in WIDTH_DIMS):
                raise ConfigError("give per-dimension fractions (heads/ffn/hidden) or param_budget, not both")
        check_type("budget_dims", self.budget_dims, list)
        if not self.budget_dims:
            raise ConfigError("budget_dims must name at least one of heads, ffn, hidden")
        for dim in self.budget_dims:
            check_choice("budget_dims[]", dim, WIDTH_DIMS)
        check_choice("importance", self.importance, ("activation", "taylor"))
        check_choice("head_unit", self.head_unit, ("query", "group"))
        check_type("per_layer", self.per_layer, bool)
        check_range("multiple_of", self.multiple_of, 1, 4096, int)
        check_range("batch_size", self.batch_size, 1, 65536, int)
        check_range("max_seq_len", self.max_seq_len, 16, 1 << 20, int)
        if self.device is not None:
            check_type("device", self.device, str)


@dataclasses.dataclass
class DepthPruneConfig(BaseConfig):
    """Depth pruning: drop whole blocks (a fraction or a count), least important first."""

    name = "depth"
    category = "prune"
    runs_on_quantized = True  # dropping blocks needs no float weights

    ratio: float | None = None  # fraction of blocks removed (rounded to the nearest block)
    num_blocks: int | None = None  # or the number of blocks removed
    importance: str = "block_influence"  # "block_influence" (1 - cos in/out) or "loss" (skip each block)
    loss_sequences: int = 16  # calibration sequences scored per skipped block for importance "loss"
    batch_size: int = 8
    max_seq_len: int = 2048
    device: str | None = None

    def __post_init__(self):
        if (self.ratio is None) == (self.num_blocks is None):
            raise ConfigError("give exactly one of ratio or num_blocks")
        if self.ratio is not None:
            check_fraction("ratio", self.ratio, " (that would remove every block)")
        if self.num_blocks is not None:
            check_range("num_blocks", self.num_blocks, 1, 1 << 20, int)
        check_choice("importance", self.importance, ("block_influence", "loss"))
        check_range("loss_sequences", self.loss_sequences, 1, 1 << 20, int)
        check_range("batch_size", self.batch_size, 1, 65536, int)
        check_range("max_seq_len", self.max_seq_len, 16, 1 << 20, int)
        if self.device is not None:
            check_type("device", self.device, str)


# --- planning: how many of each structure every layer keeps ---------------------------------------


@dataclasses.dataclass
class WidthPlan:
    """Kept counts: query heads and kv heads per layer, FFN channels per layer, hidden channels."""

    heads: list[int]
    kv_heads: list[int]
    ffn: list[int]
    hidden: int


def _round_to(value: float, multiple: int, minimum: int) -> int:
    """``value`` rounded to the nearest multiple of ``multiple``, at least ``minimum``."""
    return max(minimum, round(value / multiple) * multiple)


def plan_width(model: nn.Module, heads: float, ffn: float, hidden: float, head_unit: str, multiple_of: int) -> WidthPlan:
    """Kept counts for removing the given fractions from every layer; errors if a layer would lose all heads."""
    config = model.config
    num_layers = len(blocks(model))
    plan = WidthPlan([], [], [], config.hidden_size)
    for index in range(num_layers):
        shape = attention_shape(config, index)
        group = shape.num_heads // shape.num_kv_heads
        if head_unit == "group" or group == 1:  # whole key/value groups (MHA: a head with its k/v)
            kv_keep = shape.num_kv_heads - round(heads * shape.num_kv_heads)
            heads_keep = kv_keep * group
        else:
            kv_keep = shape.num_kv_heads
            heads_keep = (group - round(heads * group)) * kv_keep
        if heads_keep < 1:
            raise SlmkitError(f"heads={heads} would prune every attention head of layer {index} "
                              f"({shape.num_heads} heads, {shape.num_kv_heads} key/value heads)")
        plan.heads.append(heads_keep)
        plan.kv_heads.append(kv_keep)
        width = intermediate_size(config, index)
        plan.ffn.append(width if not ffn else _round_to((1 - ffn) * width, multiple_of, multiple_of))
    if hidden:
        step = multiple_of
        for count in set(plan.heads):  # transformers' configs require hidden_size % num_heads == 0
            step = step * count // math.gcd(step, count)
        plan.hidden = _round_to((1 - hidden) * config.hidden_size, step, step)
    return plan


def pruned_config(config, plan: WidthPlan, per_layer: bool):
    """The config of the pruned model: the same class with new sizes, or an SlmConfig with per-layer lists."""
    data = config.to_dict()
    uniform = len(set(plan.heads)) == 1 and len(set(plan.kv_heads)) == 1 and len(set(plan.ffn)) == 1
    if uniform and not per_layer and config.model_type != "slm":
        changes_heads = plan.hidden != config.hidden_size or plan.heads[0] != config.num_attention_heads
        if changes_heads and "head_dim" not in data:
            raise SlmkitError(f"{config.model_type} configs derive head_dim from hidden_size / heads; "
                              "only FFN width can be pruned")
        # Only fields the config has (GPT-2 calls them n_embd / n_head / n_inner).
        updates = {"hidden_size": plan.hidden, "n_embd": plan.hidden, "head_dim": attention_shape(config, 0).head_dim,
                   "num_attention_heads": plan.heads[0], "n_head": plan.heads[0],
                   "num_key_value_heads": plan.kv_heads[0], "intermediate_size": plan.ffn[0], "n_inner": plan.ffn[0]}
        data.update({key: value for key, value in updates.items() if key in data})
        return type(config).from_dict(data)
    if config.model_type not in SLM_SOURCE_TYPES:
        raise SlmkitError(f"per-layer widths need a Llama-architecture model (SlmForCausalLM); "
                          f"{config.model_type!r} can only be pruned uniformly (per_layer: false)")
    return to_slm_config(config, hidden_size=plan.hidden, head_dim=attention_shape(config, 0).head_dim,
                         num_attention_heads=max(plan.heads), num_key_value_heads=max(plan.kv_heads),
                         intermediate_size=max(plan.ffn), layer_num_heads=list(plan.heads),
                         layer_num_kv_heads=list(plan.kv_heads), layer_intermediate_sizes=list(plan.ffn))


def config_params(config) -> int:
    """Parameters of a model built from ``config`` (on the meta device: nothing is allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return parameter_count(AutoModelForCausalLM.from_config(config))


def planned_params(config, plan: WidthPlan, per_layer: bool = False) -> int:
    """Parameters of the model ``plan`` makes of a model with ``config``."""
    return config_params(pruned_config(config, plan, per_layer))


def plan_for_budget(model: nn.Module, config: WidthPruneConfig) -> tuple[WidthPlan, dict[str, float]]:
    """The plan (and fraction removed per dimension) that keeps the most parameters within the budget.

    First the smallest equal fraction over the budget dimensions whose plan meets the budget; then, as
    rounding to whole heads and to hidden sizes divisible by every head count can overshoot by a coarse
    step, each dimension in turn, finest first (FFN, hidden, heads), gets back as much as the budget
    allows, the others held.
    """
    total = parameter_count(model)
    budget = config.param_budget * total if config.param_budget < 1 else config.param_budget
    if budget >= total:
        raise SlmkitError(f"param_budget {config.param_budget:g} is not below the model's {total:,} parameters")
    dims = [d for d in config.budget_dims if d in get_spec(model).width_dims]
    if not dims:
        raise SlmkitError(f"none of budget_dims {config.budget_dims} can be pruned for this architecture "
                          f"(supported: {', '.join(get_spec(model).width_dims)})")

    def plan_of(fractions: dict[str, float]) -> WidthPlan | None:
        try:
            return plan_width(model, fractions["heads"], fractions["ffn"], fractions["hidden"],
                              config.head_unit, config.multiple_of)
        except SlmkitError:
            return None

    def plan_at(fraction: float) -> WidthPlan | None:
        return plan_of({d: (fraction if d in dims else 0.0) for d in WIDTH_DIMS})

    def fits(plan: WidthPlan | None) -> bool:
        return plan is not None and planned_params(model.config, plan) <= budget

    high = 0.95
    if not fits(plan_at(high)):
        high = 0.66  # heads rounding can make large fractions invalid; retry at a smaller maximum
        if not fits(plan_at(high)):
            raise SlmkitError(f"param_budget {budget:,.0f} cannot be reached by width pruning of {', '.join(dims)}")
    equal = _smallest_fitting(lambda fraction: fits(plan_at(fraction)), high)
    fractions = {d: (equal if d in dims else 0.0) for d in WIDTH_DIMS}
    if len(dims) > 1:  # give back what rounding overshot: one dimension at a time, the others held
        for dim in [d for d in ("ffn", "hidden", "heads") if d in dims]:
            fractions[dim] = _smallest_fitting(lambda fraction: fits(plan_of({**fractions, dim: fraction})),
                                               fractions[dim])
    return plan_of(fractions), fractions


def _smallest_fitting(fits_at, high: float) -> float:
    """The smallest fraction in [0, ``high``] (to 2⁻²⁰ of ``high``) for which ``fits_at`` holds, given that it
    holds at ``high`` and keeps holding above any fraction where it does (parameters fall as it grows)."""
    if fits_at(0.0):
        return 0.0
    low = 0.0
    for _ in range(20):
        mid = (low + high) / 2
        if fits_at(mid):
            high = mid
        else:
            low = mid
    return high


# --- choosing which structures to keep -----------------------------------------------------------


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores, in ascending index order."""
    return torch.sort(torch.topk(scores.float(), count).indices).values


def select_heads(scores: torch.Tensor, num_kv: int, heads_keep: int, kv_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept query heads, kept kv heads) of one layer, keeping groups consistent.

    Query heads of kv head ``j`` are ``j*g .. j*g+g-1`` (transformers' repeat_kv order).
    """
    group = scores.numel() // num_kv
    by_group = scores.view(num_kv, group)
    if kv_keep < num_kv:  # whole groups: rank groups by their summed head scores
        kv = _top(by_group.sum(dim=1), kv_keep)
        return (kv[:, None] * group + torch.arange(group)).flatten(), kv
    per_group = heads_keep // num_kv
    kept = torch.stack([_top(by_group[j], per_group) + j * group for j in range(num_kv)])
    return kept.flatten(), torch.arange(num_kv)


def distribute(scores: list[torch.Tensor], removed: int, unit: list[int]) -> list[int]:
    """Per-layer kept counts when the ``removed`` lowest-scoring units are dropped across layers.

    ``scores[l]`` ranks layer l's units (a unit of layer l spans ``unit[l]`` structures); every layer
    keeps at least one unit. Scores are compared after dividing by each layer's mean, so layers with
    larger activations do not keep everything.
    """
    entries = []
    for layer, layer_scores in enumerate(scores):
        normalized = layer_scores.float() / layer_scores.float().mean().clamp(min=1e-12)
        entries += [(float(s), layer) for s in normalized]
    entries.sort()
    counts = [s.numel() for s in scores]
    for _, layer in entries:
        if removed <= 0:
            break
        if counts[layer] > 1:
            counts[layer] -= 1
            removed -= 1
    return [c * u for c, u in zip(counts, unit)]


# --- surgery -------------------------------------------------------------------------------------


def _slice_linear(module: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep only ``rows`` (outputs) and ``cols`` (inputs) of a linear (nn.Linear or GPT-2 Conv1D)."""
    weight = weight_out_in(module)
    if rows is not None:
        weight = weight[rows.to(weight.device)]
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    transposed = type(module).__name__ == "Conv1D"
    module.weight = nn.Parameter((weight.t() if transposed else weight).contiguous(), module.weight.requires_grad)
    if rows is not None and getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(module.bias.data[rows.to(weight.device)].contiguous(), module.bias.requires_grad)
    out_features, in_features = weight.shape
    if transposed:
        module.nf = out_features
    else:
        module.in_features, module.out_features = in_features, out_features


def _slice_vector_params(module: nn.Module, index: torch.Tensor) -> None:
    """Keep entries ``index`` of a norm's weight (and bias)."""
    for name in ("weight", "bias"):
        param = getattr(module, name, None)
        if isinstance(param, torch.Tensor):
            setattr(module, name, nn.Parameter(param.data[index.to(param.device)].contiguous(), param.requires_grad))
    if hasattr(module, "normalized_shape"):
        module.normalized_shape = (index.numel(),)


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def prune_block_heads(model: nn.Module, block: nn.Module, index: int, heads: torch.Tensor, kv: torch.Tensor) -> None:
    """Cut ``block``'s attention down to query heads ``heads`` and key/value heads ``kv``."""
    spec = get_spec(model)
    shape = attention_shape(model.config, index)
    q_rows, kv_rows = _head_rows(heads, shape.head_dim), _head_rows(kv, shape.head_dim)
    _slice_linear(get_module(block, spec.q), rows=q_rows)
    _slice_linear(get_module(block, spec.k), rows=kv_rows)
    _slice_linear(get_module(block, spec.v), rows=kv_rows)
    _slice_linear(get_module(block, spec.o), cols=q_rows)
    attention = get_module(block, spec.o.rpartition(".")[0])
    values = {"num_heads": heads.numel(), "num_attention_heads": heads.numel(), "num_key_value_heads": kv.numel(),
              "num_key_value_groups": heads.numel() // kv.numel()}
    for attr, value in values.items():
        if hasattr(attention, attr):
            setattr(attention, attr, value)


def prune_block_ffn(model: nn.Module, block: nn.Module, index: int, channels: torch.Tensor) -> None:
    """Keep FFN channels ``channels`` of ``block`` (gate/up rows, down columns)."""
    spec = get_spec(model)
    if spec.gate_up:
        width = intermediate_size(model.config, index)
        _slice_linear(get_module(block, spec.gate_up), rows=torch.cat([channels, channels + width]))
    else:
        for name in (spec.gate, spec.up):
            if name:
                _slice_linear(get_module(block, name), rows=channels)
    _slice_linear(get_module(block, spec.down), cols=channels)


def prune_hidden(model: nn.Module, channels: torch.Tensor) -> None:
    """Keep hidden channels ``channels`` everywhere: embeddings, every norm, every projection, lm_head."""
    spec = get_spec(model)
    embed, lm_head = get_module(model, spec.embed), get_module(model, spec.lm_head)
    tied = lm_head.weight is embed.weight
    embed.weight = nn.Parameter(embed.weight.data[:, channels.to(embed.weight.device)].contiguous(),
                                embed.weight.requires_grad)
    embed.embedding_dim = channels.numel()
    if tied:
        lm_head.weight = embed.weight
        lm_head.in_features = channels.numel()
    else:
        _slice_linear(lm_head, cols=channels)
    _slice_vector_params(get_module(model, spec.final_norm), channels)
    for block in blocks(model):
        for norm in spec.hidden_norms():
            _slice_vector_params(get_module(block, norm), channels)
        for name in spec.linear_names():
            module = get_module(block, name)
            if name in (spec.o, spec.down):
                _slice_linear(module, rows=channels)
            else:
                _slice_linear(module, cols=channels)


def width_scores(model: nn.Module, calib: torch.Tensor, config,
                 checkpoint: calibration.WalkCheckpoint | None = None) -> importance.WidthScores:
    """Head / FFN / hidden scores by ``config.importance`` ("activation" or "taylor") on length-capped ``calib``
    (``config`` has importance, batch_size, max_seq_len and device, as the width configs do).

    ``checkpoint``: the activation walk keeps each block's sums there and resumes after the last finished
    block; Taylor importance (one backward pass over the whole model per sequence) keeps the sums of each
    batch of ``batch_size`` sequences and resumes after the last finished batch."""
    tokens = calibration.cap_length(calib, config.max_seq_len)
    if config.importance == "taylor":
        return importance.taylor_scores(model, tokens, config.batch_size, checkpoint=checkpoint)
    stats = checkpoint.stats("importance") if checkpoint is not None else None
    return importance.activation_scores(model, tokens, config.batch_size, config.device, checkpoint=stats)


def apply_width_plan(model: nn.Module, plan: WidthPlan, scores: importance.WidthScores, per_layer: bool) -> None:
    """Cut ``model`` down to ``plan``'s widths, keeping the highest-scoring heads and channels.

    ``per_layer`` (or a plan whose widths differ by layer) makes a Llama model an SlmForCausalLM.
    """
    num_layers = len(blocks(model))
    old_heads = [attention_shape(model.config, i) for i in range(num_layers)]
    old_ffn = [intermediate_size(model.config, i) for i in range(num_layers)]
    new_config = pruned_config(model.config, plan, per_layer)
    for index, block in enumerate(blocks(model)):
        shape = old_heads[index]
        if plan.heads[index] != shape.num_heads or plan.kv_heads[index] != shape.num_kv_heads:
            heads, kv = select_heads(scores.heads[index], shape.num_kv_heads, plan.heads[index], plan.kv_heads[index])
            prune_block_heads(model, block, index, heads, kv)
        if plan.ffn[index] != old_ffn[index]:
            prune_block_ffn(model, block, index, _top(scores.ffn[index], plan.ffn[index]))
    if plan.hidden != model.config.hidden_size:
        prune_hidden(model, _top(scores.hidden, plan.hidden))
    set_model_config(model, new_config)
    if new_config.model_type == "slm" and type(model).__name__ != "SlmForCausalLM":
        become_slm(model)


# --- the transforms --------------------------------------------------------------------------------


def _check_dims(model: nn.Module, fractions: dict[str, float]) -> None:
    spec = get_spec(model)
    for dim, fraction in fractions.items():
        if fraction and dim not in spec.width_dims:
            raise SlmkitError(f"width pruning of {dim} is not supported for {spec.family} "
                              f"(supported: {', '.join(spec.width_dims)})")


@register(WidthPruneConfig, needs_calibration=True, resumable=True)
def prune_width(model: nn.Module, config: WidthPruneConfig, calib: torch.Tensor,
                checkpoint: calibration.WalkCheckpoint | None = None) -> nn.Module:
    """Remove the least important heads, FFN channels and hidden channels of ``model`` in place.

    ``checkpoint``: where the importance walk keeps its per-block statistics, so it resumes."""
    record = get_record(model)
    if config.per_layer and model.config.model_type not in SLM_SOURCE_TYPES:
        raise SlmkitError(f"per_layer widths need a Llama-architecture model; {model.config.model_type!r} "
                          "can only be pruned uniformly (per_layer: false)")
    require_float_linears(model)
    if config.param_budget is not None:
        plan, fractions = plan_for_budget(model, config)
    else:
        fractions = {d: getattr(config, d) for d in WIDTH_DIMS}
        _check_dims(model, fractions)
        plan = plan_width(model, fractions["heads"], fractions["ffn"], fractions["hidden"], config.head_unit,
                          config.multiple_of)
    before = parameter_count(model)
    num_layers = len(blocks(model))
    old_heads = [attention_shape(model.config, i) for i in range(num_layers)]
    old_ffn = [intermediate_size(model.config, i) for i in range(num_layers)]
    if config.heads and plan.heads == [s.num_heads for s in old_heads]:
        warnings.warn(f"heads={fractions['heads']:g} rounds to removing no head; heads are unchanged", stacklevel=2)
    scores = width_scores(model, calib, config, checkpoint)
    if config.per_layer:  # same totals as the uniform plan, spread by global ranking
        removed_groups = [
            (s.num_kv_heads - kv) if kv < s.num_kv_heads else (s.num_heads - h) // s.num_kv_heads
            for s, h, kv in zip(old_heads, plan.heads, plan.kv_heads)
        ]
        whole_groups = any(kv < s.num_kv_heads for s, kv in zip(old_heads, plan.kv_heads))
        if whole_groups:
            group_scores = [h.view(s.num_kv_heads, -1).sum(1) for h, s in zip(scores.heads, old_heads)]
            sizes = [s.num_heads // s.num_kv_heads for s in old_heads]
            plan.kv_heads = distribute(group_scores, sum(removed_groups), [1] * num_layers)
            plan.heads = [kv * g for kv, g in zip(plan.kv_heads, sizes)]
        elif any(removed_groups):  # query heads: one "unit" = one head from every group of the layer
            # unit k of a layer = the k-th weakest head of every group (removed together)
            unit_scores = [torch.sort(h.view(s.num_kv_heads, -1), dim=1).values.sum(0)
                           for h, s in zip(scores.heads, old_heads)]
            plan.heads = distribute(unit_scores, sum(removed_groups), [s.num_kv_heads for s in old_heads])
        removed_ffn = sum(old_ffn) - sum(plan.ffn)
        if removed_ffn:
            kept = distribute(scores.ffn, removed_ffn // config.multiple_of * config.multiple_of, [1] * num_layers)
            plan.ffn = [max(config.multiple_of, k // config.multiple_of * config.multiple_of) if k >= config.multiple_of
                        else k for k in kept]
    apply_width_plan(model, plan, scores, config.per_layer)
    record.metrics["width"] = {"heads": plan.heads, "kv_heads": plan.kv_heads, "ffn": plan.ffn,
                               "hidden": plan.hidden, "params_before": before, "params_after": parameter_count(model)}
    return model


def _subset_config(config, keep: list[int]):
    data = config.to_dict()
    data["num_hidden_layers"] = len(keep)
    for field in ("layer_types", "layer_num_heads", "layer_num_kv_heads", "layer_intermediate_sizes"):
        if data.get(field):
            data[field] = [data[field][i] for i in keep]
    return type(config).from_dict(data)


def _renumber_modules(modules: dict[str, dict], prefix: str, keep: list[int]) -> dict[str, dict]:
    """``modules`` (path -> layout, the record's replaced modules) with the blocks' paths renumbered after
    keeping blocks ``keep``; entries of removed blocks go."""
    position = {old: new for new, old in enumerate(keep)}
    renumbered = {}
    for path, layout in modules.items():
        if path.startswith(prefix + "."):
            index, _, rest = path[len(prefix) + 1:].partition(".")
            if int(index) not in position:
                continue
            path = f"{prefix}.{position[int(index)]}.{rest}"
        renumbered[path] = layout
    return renumbered


def remove_blocks(model: nn.Module, drop: list[int]) -> None:
    """Delete blocks ``drop`` from ``model`` and renumber the rest (their KV-cache slots follow, and so do
    the paths of quantized modules the checkpoint manifest records)."""
    layers = blocks(model)
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    new_config = _subset_config(model.config, keep)
    prefix = get_spec(model).layers
    set_module(model, prefix, nn.ModuleList(layers[i] for i in keep))
    record = get_record(model)
    record.modules = _renumber_modules(record.modules, prefix, keep)
    for position, block in enumerate(blocks(model)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
        if hasattr(block, "attention_type") and getattr(new_config, "layer_types", None):
            block.attention_type = new_config.layer_types[position]
    set_model_config(model, new_config)


@register(DepthPruneConfig, needs_calibration=True, resumable=True)
def prune_depth(model: nn.Module, config: DepthPruneConfig, calib: torch.Tensor,
                checkpoint: calibration.WalkCheckpoint | None = None) -> nn.Module:
    """Drop the least important whole blocks of ``model`` in place.

    ``checkpoint``: where the block scores are kept as they are measured, so the scoring resumes."""
    total = len(blocks(model))
    count = config.num_blocks if config.num_blocks is not None else round(config.ratio * total)
    if count >= total:
        raise SlmkitError(f"cannot remove {count} of the model's {total} blocks; at least one must stay")
    if count == 0:
        warnings.warn(f"ratio={config.ratio:g} of {total} blocks rounds to 0; the model is unchanged", stacklevel=2)
        return model
    tokens = calibration.cap_length(calib, config.max_seq_len)
    if config.importance == "loss":
        scores = importance.block_loss_effect(model, tokens[: config.loss_sequences], config.batch_size,
                                              checkpoint=checkpoint)
    else:
        stats = checkpoint.stats("influence") if checkpoint is not None else None
        scores = importance.block_influence(model, tokens, config.batch_size, config.device, checkpoint=stats)
    drop = sorted(torch.topk(-scores, count).indices.tolist())
    before = parameter_count(model)
    remove_blocks(model, drop)
    get_record(model).metrics["depth"] = {"removed_blocks": drop, "scores": [round(float(s), 6) for s in scores],
                                          "params_before": before, "params_after": parameter_count(model)}
    return model
