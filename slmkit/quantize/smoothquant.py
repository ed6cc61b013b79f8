"""SmoothQuant W8A8 (Xiao et al., 2023, https://arxiv.org/abs/2211.10438).

Activations have a few channels with huge values, which ruin per-token int8; weights are easy. For each
input channel j, SmoothQuant divides the activation by ``s_j`` and multiplies the weight column by
``s_j`` — the product is unchanged — with ``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)``. The
division is folded into whatever produced the activation, so it costs nothing at run time:

- norm → q/k/v and norm → gate/up: into the norm's weight (and bias);
- v → o: into v's output rows (attention mixes positions, not channels; with GQA one scale per
  key/value channel serves every query head of its group);
- up → down (gated MLPs): into up's output rows (``down(act(gate) * up)`` is linear in up).

Then every block linear becomes a :class:`W8A8Linear` (int8 weights per output channel, int8
activations per token or per tensor). lm_head and embeddings stay float, as do modules in ``skip``.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from slmkit import calib as calibration
from slmkit.config import BaseConfig, ConfigError, check_choice, check_range, check_regexes, check_type, register
from slmkit.errors import SlmkitError
from slmkit.models.arch import FoldGroup, block_linears, blocks, fold_groups, get_spec, set_module, weight_out_in
from slmkit.models.record import get_record
from slmkit.quantize.linear import W8A8Linear, quantize_per_channel, quantize_per_tensor, quantize_per_token

FOLD_SITES = ("attn_norm->qkv", "mlp_norm->gate_up", "v->o", "up->down")


@dataclasses.dataclass
class SmoothQuantConfig(BaseConfig):
    """SmoothQuant W8A8: smoothing strength, where to smooth, and how activations are quantized."""

    name = "smoothquant"
    category = "quantize"

    alpha: float = 0.5  # migration strength: 0 keeps the difficulty on activations, 1 moves it to weights
    # When set, each fold site of each block picks from these strengths the one whose int8 output error
    # (targets' outputs on sampled calibration tokens) is lowest; ``alpha`` is then unused.
    alpha_grid: list[float] | None = None
    search_tokens: int = 1024  # calibration tokens sampled per block for the alpha search
    smoothing: bool = True  # False gives plain W8A8 (round-to-nearest), the baseline
    fold_sites: list[str] = dataclasses.field(default_factory=lambda: list(FOLD_SITES))
    activations: str = "dynamic"  # "dynamic" (per token, at run time) or "static" (per tensor, calibrated)
    skip: list[str] = dataclasses.field(default_factory=list)  # regexes of module paths kept in float
    batch_size: int = 8  # calibration sequences per forward pass

    def __post_init__(self):
        check_range("alpha", self.alpha, 0.0, 1.0)
        if self.alpha_grid is not None:
            check_type("alpha_grid", self.alpha_grid, list)
            if not self.alpha_grid:
                raise ConfigError("alpha_grid must be a non-empty list of strengths in [0, 1], or null")
            for alpha in self.alpha_grid:
                check_range("alpha_grid[]", alpha, 0.0, 1.0)
        check_range("search_tokens", self.search_tokens, 16, 1_000_000, int)
        check_type("smoothing", self.smoothing, bool)
        check_type("fold_sites", self.fold_sites, list)
        for site in self.fold_sites:
            check_choice("fold_sites[]", site, FOLD_SITES)
        check_choice("activations", self.activations, ("dynamic", "static"))
        check_regexes("skip", self.skip)
        check_range("batch_size", self.batch_size, 1, 65536, int)


# --- pure math -----------------------------------------------------------------------------------


def smoothing_scales(act_abs_max: torch.Tensor, weight_abs_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-channel smoothing factors ``s = act**alpha / weight**(1 - alpha)`` (SmoothQuant eq. 4).

    Both inputs are per input channel, shape (C,); channels that never fire keep ``s = 1``.
    """
    act = act_abs_max.float().clamp(min=1e-5)
    weight = weight_abs_max.float().clamp(min=1e-5)
    scales = act.pow(alpha) / weight.pow(1 - alpha)
    return torch.where(act_abs_max > 0, scales, torch.ones_like(scales)).clamp(min=1e-5)


def group_heads(per_channel: torch.Tensor, kv_group: int, head_dim: int) -> torch.Tensor:
    """(num_heads * head_dim,) → (num_kv_heads * head_dim,): max over the query heads sharing a kv head."""
    return per_channel.view(-1, kv_group, head_dim).amax(dim=1).reshape(-1)  # (nkv, g, hd) → (nkv*hd)


def expand_heads(per_kv_channel: torch.Tensor, kv_group: int, head_dim: int) -> torch.Tensor:
    """Inverse layout of :func:`group_heads`: repeat each kv head's scales for its query heads."""
    per_head = per_kv_channel.view(-1, 1, head_dim).expand(-1, kv_group, head_dim)  # (nkv, g, hd)
    return per_head.reshape(-1)


def w8a8_output_error(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, activations: str) -> torch.Tensor:
    """Relative error of a W8A8 linear after smoothing by ``scale``: ‖XWᵀ − Q(X/s)·Q(W·s)ᵀ‖² / ‖XWᵀ‖².

    x: (tokens, in) float activations, weight: (out, in), scale: (in,). Simulated in float (search only).
    """
    x, weight = x.float(), weight.float()
    exact = x @ weight.t()  # (tokens, out)
    x_s, w_s = x / scale, weight * scale
    w_q, w_scale = quantize_per_channel(w_s)
    if activations == "dynamic":
        x_q, x_scale = quantize_per_token(x_s)
    else:
        x_scale = (x_s.abs().amax() / 127).clamp(min=1e-8)
        x_q = quantize_per_tensor(x_s, x_scale)
    approx = (x_q.float() * x_scale) @ (w_q.float() * w_scale[:, None]).t()
    return (exact - approx).pow(2).sum() / exact.pow(2).sum().clamp(min=1e-12)


# --- model walking -------------------------------------------------------------------------------


def _fold(group: FoldGroup, source_scale: torch.Tensor, target_scale: torch.Tensor, norm_offset: float) -> None:
    """Divide the source's output channels by ``source_scale``; multiply targets' inputs by ``target_scale``."""
    rows = slice(None) if group.source_is_norm or group.source_rows is None else group.source_rows
    with torch.no_grad():
        if group.source_is_norm:
            weight = group.source.weight.data
            # y = x̂ * (offset + w)  →  y / s = x̂ * ((offset + w) / s), so w' = (offset + w) / s - offset
            weight.copy_(((norm_offset + weight.float()) / source_scale - norm_offset).to(weight.dtype))
        else:
            weight = weight_out_in(group.source)
            weight[rows] /= source_scale[:, None].to(weight.dtype)
        bias = getattr(group.source, "bias", None)
        if bias is not None:
            bias.data[rows] /= source_scale.to(bias.dtype)
        for target in group.targets:
            weight = weight_out_in(target)
            weight.mul_(target_scale[None, :].to(weight.dtype))


def _site_scales(group: FoldGroup, act_abs_max: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(source scale, target scale) of a fold site for strength ``alpha``."""
    weight_abs_max = torch.cat([weight_out_in(t).abs() for t in group.targets], dim=0).amax(dim=0).float()
    if group.kv_group > 1:  # one scale per kv channel, shared by the query heads of its group
        act = group_heads(act_abs_max, group.kv_group, group.head_dim)
        weight = group_heads(weight_abs_max, group.kv_group, group.head_dim)
        source_scale = smoothing_scales(act, weight, alpha)
        return source_scale, expand_heads(source_scale, group.kv_group, group.head_dim)
    scale = smoothing_scales(act_abs_max, weight_abs_max, alpha)
    return scale, scale


def best_alpha(group: FoldGroup, act_abs_max: torch.Tensor, samples: torch.Tensor, config: SmoothQuantConfig) -> float:
    """The strength from ``config.alpha_grid`` with the lowest summed relative output error of the targets."""
    errors = []
    for alpha in config.alpha_grid:
        _, target_scale = _site_scales(group, act_abs_max, alpha)
        error = sum(w8a8_output_error(samples, weight_out_in(t), target_scale, config.activations)
                    for t in group.targets)
        errors.append(float(error))
    return config.alpha_grid[min(range(len(errors)), key=errors.__getitem__)]


def smooth_block(model: nn.Module, block: nn.Module, input_abs_max: dict[str, torch.Tensor],
                 config: SmoothQuantConfig, input_samples: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Apply smoothing at the configured fold sites of ``block``; update ``input_abs_max`` to match.

    Returns the strength used per fold site (searched when ``config.alpha_grid`` and samples are given).
    """
    spec = get_spec(model)
    names = {id(module): name for name, module in block_linears(model, block)}
    chosen = {}
    for group in fold_groups(model, block):
        if group.name not in config.fold_sites:
            continue
        target_names = [names[id(t)] for t in group.targets]
        act = torch.stack([input_abs_max[n] for n in target_names]).amax(dim=0)  # same input for all
        alpha = config.alpha
        if config.alpha_grid and input_samples is not None:
            alpha = best_alpha(group, act, input_samples[target_names[0]], config)
        source_scale, target_scale = _site_scales(group, act, alpha)
        _fold(group, source_scale, target_scale, spec.norm_offset)
        chosen[group.name] = alpha
        for name in target_names:
            input_abs_max[name] = input_abs_max[name] / target_scale
    return chosen


def quantize_block(block: nn.Module, prefix: str, linears: list[tuple[str, nn.Module]],
                   input_abs_max: dict[str, torch.Tensor], config: SmoothQuantConfig) -> dict[str, dict]:
    """Replace each linear of ``block`` (unless skipped) by a W8A8Linear; return their layouts by path."""
    layouts = {}
    for name, module in linears:
        path = f"{prefix}.{name}"
        if any(re.search(pattern, path) for pattern in config.skip):
            continue
        quantized = W8A8Linear.from_float(
            weight_out_in(module), module.bias, config.activations, input_abs_max.get(name)
        )
        set_module(block, name, quantized)
        layouts[path] = quantized.layout()
    return layouts


@register(SmoothQuantConfig, needs_calibration=True)
def smoothquant(model: nn.Module, config: SmoothQuantConfig, calib: torch.Tensor) -> nn.Module:
    """Smooth and quantize every block of ``model`` to W8A8, one block at a time, in place.

    Args:
        model: a model from ``slmkit.load_model`` (any supported architecture).
        config: the SmoothQuantConfig.
        calib: calibration token ids (num_blocks, block_len), e.g. ``slmkit.calib_data(model)``.
    """
    spec = get_spec(model)
    record = get_record(model)
    layers_path = spec.layers
    for name, module in block_linears(model, blocks(model)[0]):
        if not module.weight.is_floating_point():
            raise SlmkitError(f"{layers_path}.0.{name} is already quantized ({type(module).__name__}); "
                              "SmoothQuant needs a float model")
    for layer in calibration.layerwise(model, calib, config.batch_size, desc="smoothquant"):
        linears = list(block_linears(model, layer.block))
        input_abs_max, samples = {}, None
        if config.smoothing and config.alpha_grid:  # one block run collects both statistics
            sampler = calibration.row_sampler(config.search_tokens, calib.numel())
            both = calibration.observe_inputs(layer, dict(linears), calibration.combine(calibration.abs_max_reduce, sampler))
            input_abs_max = {name: stats[0] for name, stats in both.items()}
            samples = {name: stats[1] for name, stats in both.items()}
        elif config.smoothing or config.activations == "static":
            input_abs_max = calibration.input_abs_max(layer, dict(linears))
        if config.smoothing:
            chosen = smooth_block(model, layer.block, input_abs_max, config, samples)
            record.metrics.setdefault("smoothquant_alpha", {})[str(layer.index)] = chosen
            linears = list(block_linears(model, layer.block))
        prefix = f"{layers_path}.{layer.index}"
        record.modules.update(quantize_block(layer.block, prefix, linears, input_abs_max, config))
    return model
