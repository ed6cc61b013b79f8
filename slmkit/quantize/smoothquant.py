"""SmoothQuant W8A8 (Xiao et al., 2023, https://arxiv.org/abs/2211.10438).

Activations have a few channels with huge values, which ruin per-token int8; weights are easy. For each
input channel j, SmoothQuant divides the activation by ``s_j`` and multiplies the weight column by
``s_j`` — the product is unchanged — with ``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)``. The
division is folded into whatever produced the activation, so it costs nothing at run time:

- norm → q/k/v and norm → gate/up: into the norm's weight (and bias);
- v → o: into v's output rows (attention mixes positions, not channels; with GQA one scale per
  key/value channel serves every query head of its group);
- up → down (gated MLPs): into up's output rows (``down(act(gate) * up)`` is linear in up).

With ``alpha_grid`` the strength is searched per fold site of each block: first each site alone by its
linears' int8 output error, then (``search_objective="block"``, the default) site by site by the int8
error of the whole block's output.

Then every block linear becomes a :class:`W8A8Linear` (int8 weights per output channel, int8
activations per token or per tensor). lm_head and embeddings stay float, as do modules in ``skip``.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn
from tqdm.auto import tqdm

from slmkit import calib as calibration
from slmkit.config import (BaseConfig, ConfigError, check_choice, check_fraction, check_range, check_regexes,
                           check_type, register)
from slmkit.models.arch import (FoldGroup, block_linears, block_targets, blocks, fold_groups, get_spec, set_module,
                                weight_out_in)
from slmkit.models.record import get_record
from slmkit.quantize.base import require_unquantized
from slmkit.quantize.gptq import gptq_quantize
from slmkit.quantize.linear import W8A8Linear, quantize_per_channel, quantize_per_tensor, quantize_per_token

FOLD_SITES = ("attn_norm->qkv", "mlp_norm->gate_up", "v->o", "up->down")


@dataclasses.dataclass
class SmoothQuantConfig(BaseConfig):
    """SmoothQuant W8A8: smoothing strength, where to smooth, and how activations are quantized."""

    name = "smoothquant"
    category = "quantize"

    alpha: float = 0.5  # migration strength: 0 keeps the difficulty on activations, 1 moves it to weights
    # When set, each fold site of each block picks from these strengths the one with the lowest int8
    # error (see search_objective); ``alpha`` is then unused.
    alpha_grid: list[float] | None = None
    search_tokens: int = 1024  # calibration tokens sampled per block for the alpha search
    # What the search minimises: "linear" scores each site alone by its linears' int8 output error;
    # "block" starts there and refines the sites one at a time (each alpha of the grid, the other sites
    # held) by the error of the whole block's output with every linear in W8A8, on whole calibration
    # sequences of about search_tokens tokens (attention and the MLP's nonlinearity included). On
    # SmolLM2 (scripts/compare_smoothquant.py, 16,368 held-out tokens) "block" gave KL 0.0090 and 93.71%
    # top-1 agreement against "linear"'s 0.0111 and 93.37% (perplexity +1.09% against +0.63%: the
    # closer model, though this perplexity moved the other way).
    search_objective: str = "block"
    smoothing: bool = True  # False gives plain W8A8 (round-to-nearest), the baseline
    fold_sites: list[str] = dataclasses.field(default_factory=lambda: list(FOLD_SITES))
    activations: str = "dynamic"  # "dynamic" (per token, at run time) or "static" (per tensor, calibrated)
    skip: list[str] = dataclasses.field(default_factory=list)  # regexes of module paths kept in float
    batch_size: int = 8  # calibration sequences per forward pass
    # How the int8 weights are rounded after smoothing: "rtn" (nearest) or "gptq" (error compensation
    # against the smoothed calibration inputs' Hessian, per output channel).
    weight_method: str = "rtn"
    # Mixed precision: this fraction of the block linears' weights stays in float, spent on the linears
    # whose int8 quantization alone moves the output most (KL per weight, measured on the first
    # ``sensitivity_blocks`` calibration sequences before quantizing).
    float_budget: float = 0.0
    sensitivity_blocks: int = 4
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = True

    def __post_init__(self):
        check_range("alpha", self.alpha, 0.0, 1.0)
        if self.alpha_grid is not None:
            check_type("alpha_grid", self.alpha_grid, list)
            if not self.alpha_grid:
                raise ConfigError("alpha_grid must be a non-empty list of strengths in [0, 1], or null")
            for alpha in self.alpha_grid:
                check_range("alpha_grid[]", alpha, 0.0, 1.0)
        check_range("search_tokens", self.search_tokens, 16, 1_000_000, int)
        check_choice("search_objective", self.search_objective, ("linear", "block"))
        check_type("smoothing", self.smoothing, bool)
        check_type("fold_sites", self.fold_sites, list)
        for site in self.fold_sites:
            check_choice("fold_sites[]", site, FOLD_SITES)
        check_choice("activations", self.activations, ("dynamic", "static"))
        check_regexes("skip", self.skip)
        check_range("batch_size", self.batch_size, 1, 65536, int)
        check_choice("weight_method", self.weight_method, ("rtn", "gptq"))
        check_fraction("float_budget", self.float_budget)
        check_range("sensitivity_blocks", self.sensitivity_blocks, 1, 65536, int)
        check_range("gptq_damp", self.gptq_damp, 0.0, 10.0)
        check_range("gptq_block_size", self.gptq_block_size, 1, 1 << 16, int)
        check_type("gptq_act_order", self.gptq_act_order, bool)


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


def fold_scales(group: FoldGroup, source_scale: torch.Tensor, target_scale: torch.Tensor, norm_offset: float) -> None:
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


def _site_inputs(group: FoldGroup, names: dict[int, str],
                 input_abs_max: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """A fold site's target names (``names``: id(module) → block-relative name) and their input's max |x|."""
    target_names = [names[id(t)] for t in group.targets]
    act = torch.stack([input_abs_max[n] for n in target_names]).amax(dim=0)  # same input for all
    return target_names, act


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
                 config: SmoothQuantConfig, input_samples: dict[str, torch.Tensor] | None = None,
                 target_scales: dict[str, torch.Tensor] | None = None,
                 alphas: dict[str, float] | None = None) -> dict[str, float]:
    """Apply smoothing at the configured fold sites of ``block``; update ``input_abs_max`` to match.

    Returns the strength used per fold site: ``alphas[site]`` when given, else searched when
    ``config.alpha_grid`` and samples are given, else ``config.alpha``. ``target_scales``, when given,
    receives the factor each smoothed linear's input was divided by.
    """
    spec = get_spec(model)
    names = {id(module): name for name, module in block_linears(model, block)}
    chosen = {}
    for group in fold_groups(model, block):
        if group.name not in config.fold_sites:
            continue
        target_names, act = _site_inputs(group, names, input_abs_max)
        alpha = config.alpha
        if alphas is not None and group.name in alphas:
            alpha = alphas[group.name]
        elif config.alpha_grid and input_samples is not None:
            alpha = best_alpha(group, act, input_samples[target_names[0]], config)
        source_scale, target_scale = _site_scales(group, act, alpha)
        fold_scales(group, source_scale, target_scale, spec.norm_offset)
        chosen[group.name] = alpha
        for name in target_names:
            input_abs_max[name] = input_abs_max[name] / target_scale
            if target_scales is not None:
                target_scales[name] = target_scale
    return chosen


def _batch_rows(value, rows: int, batch: int):
    """``value`` (tensor, or tuple/list of them) with a leading batch dimension of ``batch`` cut to ``rows``."""
    if isinstance(value, torch.Tensor):
        return value[:rows] if value.ndim >= 2 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_batch_rows(v, rows, batch) for v in value)
    return value


def block_search_inputs(layer: calibration.LayerCalibration, tokens: int) -> tuple[torch.Tensor, tuple, dict]:
    """Whole sequences of the first calibration batch covering about ``tokens`` tokens: (hidden, args, kwargs)."""
    hidden, args, kwargs = layer.hidden_states[0], layer.extra_args[0], layer.kwargs[0]
    batch, length = hidden.shape[:2]
    rows = min(batch, max(1, -(-tokens // length)))
    if rows == batch or batch == length:  # batch == length: which dimension is the batch is ambiguous
        return hidden, args, kwargs
    return (hidden[:rows], _batch_rows(args, rows, batch),
            {key: _batch_rows(value, rows, batch) for key, value in kwargs.items()})


def trial_block_error(model: nn.Module, layer: calibration.LayerCalibration, inputs: tuple,
                      reference: torch.Tensor, input_abs_max: dict[str, torch.Tensor],
                      config: SmoothQuantConfig, alphas: dict[str, float]) -> float:
    """Squared error against ``reference`` of the block's output on ``inputs`` (hidden, args, kwargs)
    when smoothed with ``alphas`` per site and the linears :func:`quantize_block` will quantize (all but
    ``config.skip``) made W8A8 with round-to-nearest weights (GPTQ, when configured, rounds only the final
    choice). The block is left exactly as it was."""
    block = layer.block
    saved = {key: value.clone() for key, value in block.state_dict().items()}
    abs_max = dict(input_abs_max)
    with torch.no_grad():
        try:
            smooth_block(model, block, abs_max, dataclasses.replace(config, alpha_grid=None), alphas=alphas)
            linears = list(block_targets(model, layer.index, block, config.skip).items())
            try:
                for name, module in linears:
                    quantized = W8A8Linear.from_float(weight_out_in(module), getattr(module, "bias", None),
                                                      config.activations, abs_max.get(name))
                    set_module(block, name, quantized)
                return float((calibration.run_block(block, *inputs).float() - reference).pow(2).sum())
            finally:
                for name, module in linears:
                    set_module(block, name, module)
        finally:
            block.load_state_dict(saved)


def search_alphas_by_block_output(model: nn.Module, layer: calibration.LayerCalibration,
                                  input_abs_max: dict[str, torch.Tensor], samples: dict[str, torch.Tensor],
                                  config: SmoothQuantConfig) -> dict[str, float]:
    """Per-site strengths for the lowest W8A8 error of the block's output (``search_objective="block"``).

    Starts from each site's own best (:func:`best_alpha`), then tries every strength of the grid at one
    site at a time, the others held, keeping a change when the squared error of the block's output drops.
    The output is that of the block :func:`quantize_block` will make: every linear a real :class:`W8A8Linear`
    except those ``config.skip`` keeps float, run on :func:`block_search_inputs` (:func:`trial_block_error`).
    The block is restored exactly after each trial; the caller applies the result with :func:`smooth_block`.
    """
    block = layer.block
    names = {id(module): name for name, module in block_linears(model, block)}
    groups = [g for g in fold_groups(model, block) if g.name in config.fold_sites]
    alphas = {}
    for group in groups:
        target_names, act = _site_inputs(group, names, input_abs_max)
        alphas[group.name] = best_alpha(group, act, samples[target_names[0]], config)
    inputs = block_search_inputs(layer, config.search_tokens)
    with torch.no_grad():
        reference = calibration.run_block(block, *inputs).float()
    best = trial_block_error(model, layer, inputs, reference, input_abs_max, config, alphas)
    for group in groups:
        for alpha in config.alpha_grid:
            if alpha == alphas[group.name]:
                continue
            trial = {**alphas, group.name: alpha}
            trial_error = trial_block_error(model, layer, inputs, reference, input_abs_max, config, trial)
            if trial_error < best:
                best, alphas = trial_error, trial
    return alphas


def quantize_block(block: nn.Module, prefix: str, linears: dict[str, nn.Module],
                   input_abs_max: dict[str, torch.Tensor], config: SmoothQuantConfig,
                   hessians: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """Replace each of ``linears`` (block-relative name → linear) by a W8A8Linear; return layouts by path.

    With ``hessians`` (input XᵀX per linear, after smoothing) the int8 weights are rounded by GPTQ.
    """
    layouts = {}
    for name, module in linears.items():
        path = f"{prefix}.{name}"
        if hessians is not None:
            codes, scale, _, _ = gptq_quantize(weight_out_in(module), hessians[name], 8, None, True,
                                               config.gptq_block_size, config.gptq_damp, config.gptq_act_order,
                                               what=path, scale_dtype=torch.float32)
            quantized = W8A8Linear.from_quantized(codes, scale[:, 0], module.bias, config.activations,
                                                  input_abs_max.get(name), dtype=weight_out_in(module).dtype)
        else:
            quantized = W8A8Linear.from_float(
                weight_out_in(module), module.bias, config.activations, input_abs_max.get(name)
            )
        set_module(block, name, quantized)
        layouts[path] = quantized.layout()
    return layouts


class _RecordedOutput(nn.Module):
    """Stands in for the unchanged blocks before the one measured: returns that prefix's recorded output."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


def layer_sensitivity(model: nn.Module, tokens: torch.Tensor) -> dict[str, float]:
    """Mean per-token KL(float model ‖ model with only this linear in W8A8) for every block linear, by path.

    Each linear is quantized alone (no smoothing, dynamic per-token activations) and put back; ``tokens`` (B, T)
    are a few calibration sequences. This is the measured sensitivity mixed precision ranks by.

    The model's own forward computes every KL (its masks, final norm and head included), but the blocks
    before the measured one are stood in for by their recorded float output, so a measurement in block i
    costs the blocks from i on: about half the work of full forwards.
    """
    spec = get_spec(model)
    layers = blocks(model)
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    outputs: dict[int, object] = {}
    hooks = [layer.register_forward_hook(lambda module, args, out, index=index: outputs.__setitem__(index, out))
             for index, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            reference = torch.log_softmax(model(input_ids=tokens, use_cache=False).logits.float(), dim=-1)
            reference_prob = reference.exp()
            reference_term = (reference_prob * reference).sum(dim=-1)  # Σ p log p, per token
            del reference
    finally:
        for hook in hooks:
            hook.remove()
    result = {}
    progress = tqdm(total=sum(len(list(block_linears(model, b))) for b in layers), desc="sensitivity", unit="linear")
    originals = list(layers)
    try:
        with torch.no_grad():
            for index, block in enumerate(originals):
                if index:
                    stand_in = _RecordedOutput(outputs.pop(index - 1))
                    for before in range(index):
                        layers[before] = stand_in
                for name, module in block_linears(model, block):
                    quantized = W8A8Linear.from_float(weight_out_in(module), getattr(module, "bias", None), "dynamic")
                    set_module(block, name, quantized)
                    try:
                        logits = torch.log_softmax(model(input_ids=tokens, use_cache=False).logits.float(), dim=-1)
                    finally:
                        set_module(block, name, module)
                    kl = (reference_term - (reference_prob * logits).sum(dim=-1)).mean()
                    result[f"{spec.layers}.{index}.{name}"] = max(float(kl), 0.0)  # rounding can dip below 0
                    progress.update()
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
        progress.close()
    return result


def keep_in_float(sensitivity: dict[str, float], sizes: dict[str, int], budget: float) -> list[str]:
    """Paths to keep in float: highest KL per weight first, while their weights fit ``budget`` of the total."""
    allowed = budget * sum(sizes.values())
    kept, used = [], 0
    for path in sorted(sensitivity, key=lambda p: sensitivity[p] / sizes[p], reverse=True):
        if used + sizes[path] <= allowed:
            kept.append(path)
            used += sizes[path]
    return kept


@register(SmoothQuantConfig, needs_calibration=True, resumable=True)
def smoothquant(model: nn.Module, config: SmoothQuantConfig, calib: torch.Tensor,
                checkpoint: calibration.WalkCheckpoint | None = None) -> nn.Module:
    """Smooth and quantize every block of ``model`` to W8A8, one block at a time, in place.

    Args:
        model: a model from ``slmkit.load_model`` (any supported architecture).
        config: the SmoothQuantConfig.
        calib: calibration token ids (num_blocks, block_len), e.g. ``slmkit.calib_data(model)``.
        checkpoint: save each finished block (and the sensitivity measurement) there; an interrupted
            run given the same checkpoint resumes after the last finished block.
    """
    spec = get_spec(model)
    record = get_record(model)
    layers_path = spec.layers
    require_unquantized(model, "smoothquant")
    if config.float_budget > 0:
        sensitivity = calibration.cached(checkpoint, "sensitivity",
                                         lambda: layer_sensitivity(model, calib[: config.sensitivity_blocks]))
        sizes = {f"{layers_path}.{index}.{name}": weight_out_in(module).numel()
                 for index, block in enumerate(blocks(model)) for name, module in block_linears(model, block)}
        kept = keep_in_float(sensitivity, sizes, config.float_budget)
        record.metrics["mixed_precision"] = {"float_budget": config.float_budget, "kept_in_float": kept,
                                             "sensitivity_kl": sensitivity}
        config = dataclasses.replace(config, skip=config.skip + [f"^{re.escape(path)}$" for path in kept])
    search = config.smoothing and bool(config.alpha_grid)
    gptq = config.weight_method == "gptq"
    for layer in calibration.layerwise(model, calib, config.batch_size, desc="smoothquant", checkpoint=checkpoint):
        linears = list(block_linears(model, layer.block))
        # one block run collects every statistic: max |x|, token samples (alpha search), XᵀX (GPTQ)
        reducers = [calibration.abs_max_reduce]
        if search:
            reducers.append(calibration.row_sampler(config.search_tokens, calib.numel()))
        if gptq:
            reducers.append(calibration.gram_reduce)
        stats = calibration.observe_inputs(layer, dict(linears), calibration.combine(*reducers))
        input_abs_max = {name: s[0] for name, s in stats.items()}
        samples = {name: s[1] for name, s in stats.items()} if search else None
        scales: dict[str, torch.Tensor] = {}
        if config.smoothing:
            alphas = None
            if search and config.search_objective == "block":
                alphas = search_alphas_by_block_output(model, layer, input_abs_max, samples, config)
            chosen = smooth_block(model, layer.block, input_abs_max, config, samples, scales, alphas)
            record.metrics.setdefault("smoothquant_alpha", {})[str(layer.index)] = chosen
        hessians = None
        if gptq:  # the smoothed input is x / s, so its XᵀX is divided by s_i s_j
            hessians = {}
            for name, s in stats.items():
                gram, count = s[-1]
                scale = scales.get(name)
                if scale is not None:
                    gram = gram / (scale[:, None] * scale[None, :])
                hessians[name] = gram * (2.0 / count)
        prefix = f"{layers_path}.{layer.index}"
        targets = block_targets(model, layer.index, layer.block, config.skip)
        record.modules.update(quantize_block(layer.block, prefix, targets, input_abs_max, config, hessians))
        del stats, hessians
    return model
