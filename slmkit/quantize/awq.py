"""AWQ (Lin et al., 2024, https://arxiv.org/abs/2306.00978): activation-aware weight-only quantization.

Weights that meet large activations matter most. For each fold site of a block (norm → q/k/v,
norm → gate/up, v → o, up → down; the same exact folds SmoothQuant uses) AWQ scales the targets' input
columns up by ``s = mean|x|^α`` (normalised to geometric mean 1) and folds ``1/s`` into the source, so
the salient columns get finer quantization steps. ``α`` is searched on a grid (α = 0 is plain RTN) for
the lowest output error. Then, per linear, each (row, group) searches a clipping ratio of its range, and
the scaled weights are rounded to nearest or, with ``weight_method="gptq"``, by GPTQ against the scaled
inputs' XᵀX.

Both searches score a candidate by the exact output error over *all* calibration tokens,
``Σ_t ‖(W − Q(W)) x_t‖² = tr(D · XᵀX · Dᵀ)`` with ``D = W − Q(W)``, from the Gram matrix XᵀX that
:func:`slmkit.calib.gram_reduce` accumulates, instead of re-running the layer on a token sample. That
Gram is first pulled toward its diagonal (``gram_shrink``, :func:`slmkit.calib.shrink_gram`), so the
searches fit less of the calibration domain's correlations between inputs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from slmkit import calib as calibration
from slmkit.config import check_choice, check_range, register
from slmkit.models.arch import block_linears, block_targets, fold_groups, get_spec, weight_out_in
from slmkit.models.record import get_record
from slmkit.quantize.base import (CalibratedWeightQuantConfig, ClipSearchFields,
                                  replace_with_weight_only, require_unquantized)
from slmkit.quantize.gptq import gptq_quantize
from slmkit.quantize.groupwise import fake_quantize, group_params, quantize_codes, search_clip
from slmkit.quantize.smoothquant import expand_heads, fold_scales, group_heads


@dataclasses.dataclass
class AWQConfig(ClipSearchFields, CalibratedWeightQuantConfig):
    """AWQ weight-only quantization: ``AWQConfig(scheme="W4A16", group_size=128)``."""

    name = "awq"

    grid: int = 20  # strengths tried per fold site: α = 0, 1/grid, ..., (grid-1)/grid
    # clip / max_shrink / clip_grid / clip_two_sided (ClipSearchFields): after scaling, a clipping ratio
    # per (row, group) (asymmetric with clip_two_sided: one per end of the range), down to
    # 1 - max_shrink (0.2, as GPTQ; one-sided searches may also widen so that neither end clips,
    # groupwise.widening), by the lowest output error. The original AWQ searches down to
    # 0.5; on SmolLM2 W4 0.2 was better in both domains at g128 and g64, symmetric and not (calibrated on
    # Shakespeare, python-docs perplexity 13.48 → 13.07 at g128 symmetric): the deeper clips fit the
    # calibration text, not the weights.
    # How the scaled weights are rounded: "rtn" (nearest, with the clipped group ranges) or "gptq" (the
    # clipped ranges, then GPTQ's error compensation against the scaled inputs' XᵀX, act-order with
    # static groups, so the stored format is the same)
    weight_method: str = "rtn"
    gptq_damp: float = 0.01
    gptq_block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        check_range("grid", self.grid, 1, 1000, int)
        check_choice("weight_method", self.weight_method, ("rtn", "gptq"))
        check_range("gptq_damp", self.gptq_damp, 0.0, 10.0)
        check_range("gptq_block_size", self.gptq_block_size, 1, 1 << 16, int)
        self.check_clip_search()


# --- pure math -----------------------------------------------------------------------------------


def output_error(diff: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``tr(D G Dᵀ)``: summed squared output error of weight error ``diff`` (out, in) over the tokens of ``gram``."""
    return ((diff @ gram) * diff).sum()


def awq_scales(act_mean: torch.Tensor, alpha: float, kv_group: int = 1, head_dim: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(source scale, target scale) for strength ``alpha``: ``mean|x|^α`` normalised to geometric-mean 1.

    With GQA (``kv_group`` > 1, v → o) one scale serves each key/value channel and every query head
    reading it.
    """
    act = group_heads(act_mean, kv_group, head_dim) if kv_group > 1 else act_mean
    s = act.float().clamp(min=1e-4).pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return s, (expand_heads(s, kv_group, head_dim) if kv_group > 1 else s)


def search_alpha(weights: list[torch.Tensor], gram: torch.Tensor, act_mean: torch.Tensor, bits: int,
                 group_size: int | None, symmetric: bool, grid: int, kv_group: int = 1, head_dim: int = 0
                 ) -> tuple[float, list[float]]:
    """The strength α in {0, 1/grid, ...} whose scaled-then-quantized targets have the lowest output error."""
    errors = []
    for step in range(grid):
        alpha = step / grid
        _, s = awq_scales(act_mean, alpha, kv_group, head_dim)
        error = sum(output_error(w.float() - fake_quantize(w.float() * s, bits, group_size, symmetric) / s, gram)
                    for w in weights)
        errors.append(float(error))
    best = min(range(grid), key=errors.__getitem__)
    return best / grid, errors


# --- model walking -------------------------------------------------------------------------------


def _stats_reduce(x: torch.Tensor, state: tuple | None) -> tuple:
    """(XᵀX, token count, Σ|x| per channel) in one pass."""
    gram = calibration.gram_reduce(x, None if state is None else state[:2])
    abs_sum = x.float().abs().sum(dim=0)
    return (*gram, abs_sum if state is None else state[2] + abs_sum)


@register(AWQConfig, needs_calibration=True, resumable=True)
def awq(model: nn.Module, config: AWQConfig, calib: torch.Tensor,
        checkpoint: calibration.WalkCheckpoint | None = None) -> nn.Module:
    """Quantize every block linear of ``model`` in place with AWQ on ``calib`` tokens, one block at a time.

    With a ``checkpoint``, each finished block is saved and an interrupted run resumes after the last one.
    """
    require_unquantized(model, "awq")
    record = get_record(model)
    spec = get_spec(model)
    tokens = calibration.cap_length(calib, config.max_seq_len)
    chosen_alpha = record.metrics.setdefault("awq_alpha", {})
    for layer in calibration.layerwise(model, tokens, config.batch_size, config.device, desc="awq",
                                       checkpoint=checkpoint):
        targets = block_targets(model, layer.index, layer.block, config.skip)
        linears = dict(block_linears(model, layer.block))
        representative = {name: group[0] for group in spec.input_groups() for name in group}
        reps = {representative[name] for name in targets}
        stats = calibration.observe_inputs(layer, {name: linears[name] for name in reps}, _stats_reduce)
        grams = {name: calibration.shrink_gram(gram / count, config.gram_shrink)
                 for name, (gram, count, _) in stats.items()}
        names = {id(module): name for name, module in linears.items()}
        site_alpha = {}
        for group in fold_groups(model, layer.block):
            members = [names[id(t)] for t in group.targets]
            quantized = [n for n in members if n in targets]
            if not quantized:
                continue
            rep = representative[members[0]]
            gram, count, abs_sum = stats[rep]
            alpha, _ = search_alpha([weight_out_in(linears[n]) for n in quantized], grams[rep], abs_sum / count,
                                    config.bits, config.group_size, config.symmetric, config.grid,
                                    group.kv_group, group.head_dim)
            site_alpha[group.name] = alpha
            if alpha > 0:
                source_scale, target_scale = awq_scales(abs_sum / count, alpha, group.kv_group, group.head_dim)
                fold_scales(group, source_scale, target_scale, spec.norm_offset)
                grams[rep] = grams[rep] / (target_scale[:, None] * target_scale[None, :])
        chosen_alpha[str(layer.index)] = site_alpha
        for name, module in targets.items():
            weight, gram = weight_out_in(module), grams[representative[name]]
            if config.weight_method == "gptq":
                codes, scale, zero, _ = gptq_quantize(weight, gram, config.bits, config.group_size, config.symmetric,
                                                      config.gptq_block_size, config.gptq_damp, act_order=True,
                                                      what=f"block {layer.index} {name}", clip=config.clip_search())
            else:
                clip = config.clip_search()
                ratio = (search_clip(weight, gram, config.bits, config.group_size, config.symmetric, *clip)
                         if clip else 1.0)
                scale, zero = group_params(weight, config.bits, config.group_size, config.symmetric, ratio)
                codes = quantize_codes(weight, scale, zero, config.bits, config.group_size)
            replace_with_weight_only(model, layer.index, layer.block, name, codes, scale, zero, config)
        del stats, grams
    return model
