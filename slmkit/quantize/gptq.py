"""GPTQ (Frantar et al., 2023, https://arxiv.org/abs/2210.17323): quantize columns one at a time and spread
each column's rounding error over the columns not yet quantized, through the Cholesky factor of ``H⁻¹``
with ``H = 2 XᵀX / n`` from the calibration inputs of the layer (:func:`slmkit.calib.gram_reduce`).

- Block updates: columns are processed in blocks of ``block_size``; the error of a block reaches the
  rest of the matrix in one matmul (the "lazy batch" update).
- Groups: a group's scale/zero come from its columns *as updated so far* when the walk reaches it, in
  the natural column order. With ``act_order`` the columns are visited by decreasing ``H_jj`` (most
  active inputs first); the groups then stay the natural contiguous ones ("static groups", computed
  from the original weight up front), so the packed format and the kernels need no column index.
- Clipping search (``clip``, on by default): the up-front scales (static groups, or per channel) shrink
  each (row, group)'s range (or widen it by up to a step, where the plain range clips an end) by the
  ratio whose rounding error ``tr(D H Dᵀ)`` is lowest, as AWQ's clip search does, before the column walk
  starts.
- Shrinkage (``gram_shrink``): H is first pulled toward its diagonal (:func:`slmkit.calib.shrink_gram`):
  each input's energy stays, the correlations between inputs, which one calibration domain over-fits,
  are damped (SmolLM2 W4 g64, calibrated on Shakespeare: +24% → +15% perplexity on python-docs).
- Dampening: ``damp · mean(diag H)`` is added to the diagonal. A Hessian that is still not positive
  definite gets ten times more, up to four times, each with a warning; past that the layer falls back
  to round-to-nearest with a warning, never a crash.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from slmkit import calib as calibration
from slmkit.config import check_range, check_type, register
from slmkit.models.arch import block_targets, get_spec, weight_out_in
from slmkit.models.record import get_record
from slmkit.quantize.base import (CalibratedWeightQuantConfig, ClipSearchFields,
                                  replace_with_weight_only, require_unquantized)
from slmkit.quantize.groupwise import SCALE_DTYPE, group_params, qrange, search_clip

_DAMP_RETRIES = 4


@dataclasses.dataclass
class GPTQConfig(ClipSearchFields, CalibratedWeightQuantConfig):
    """GPTQ weight-only quantization: ``GPTQConfig(scheme="W4A16", group_size=128, act_order=True)``."""

    name = "gptq"

    block_size: int = 128  # columns per lazy batch update
    damp: float = 0.01  # added to the Hessian diagonal, as a fraction of its mean
    act_order: bool = True  # visit columns by decreasing activation energy (static groups)
    # clip / max_shrink / clip_grid / clip_two_sided (ClipSearchFields): the static group scales (act_order,
    # or per channel) come from a clipping search: per (row, group) the ratio of the range, down to
    # 1 - max_shrink (or widened up to the range that does not clip, groupwise.widening; not two-sided),
    # whose rounding error through the Hessian is lowest. On SmolLM2 W4 g128 it takes the perplexity rise
    # from +10.2% to +6.2% on the calibration domain and from +26.0% to +17.9% on another (python-docs;
    # scripts/compare_quant.py).

    def __post_init__(self):
        super().__post_init__()
        check_range("block_size", self.block_size, 1, 1 << 16, int)
        check_range("damp", self.damp, 0.0, 10.0)
        check_type("act_order", self.act_order, bool)
        self.check_clip_search()


# --- pure math -----------------------------------------------------------------------------------


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, what: str = "layer") -> tuple[torch.Tensor, float] | None:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with λ = damp · mean(diag H), and the damp used.

    Retries with ten times more dampening (warning each time) while H is not positive definite; returns
    None when even that fails.
    """
    mean_diag = torch.diag(hessian).mean().clamp(min=1e-8)
    for attempt in range(_DAMP_RETRIES + 1):
        h = hessian.clone()
        h.diagonal().add_(damp * mean_diag)
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, damp
        if attempt < _DAMP_RETRIES:
            warnings.warn(f"GPTQ: the Hessian of {what} is not positive definite with damp={damp:g}; "
                          f"retrying with damp={damp * 10:g}", stacklevel=2)
            damp = damp * 10 if damp > 0 else 0.01
    return None


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None,
                  symmetric: bool, block_size: int = 128, damp: float = 0.01, act_order: bool = True,
                  what: str = "layer", scale_dtype: torch.dtype = SCALE_DTYPE,
                  clip: tuple[float, int, bool] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """GPTQ one (out, in) weight against ``hessian`` (in, in), any positive scale of XᵀX.
    ``scale_dtype``: dtype of the returned scales (float16 for weight-only, float32 for W8A8).
    ``clip``: (max_shrink, grid, two_sided) of a clipping search for the up-front (static or per-channel) scales.

    Returns (codes int8 (out, in), scale (out, G), zero (out, G) or None, info) where info has the damp
    used and ``fallback`` (True when the Hessian could not be factored and RTN was used instead).
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    out, cols = w.shape
    low, high = qrange(bits)
    dead = torch.diag(h) == 0  # inputs never active: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static = act_order and group_size is not None
    if static or group_size is None:  # parameters fixed up front (per channel: from the whole row)
        ratio = 1.0 if clip is None else search_clip(w, h, bits, group_size, symmetric, *clip)
        fixed_scale, fixed_zero = group_params(w, bits, group_size, symmetric, ratio, scale_dtype=scale_dtype)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    factored = inverse_hessian_factor(h, damp, what)
    if factored is None:
        warnings.warn(f"GPTQ: the Hessian of {what} stays singular after dampening; using round-to-nearest",
                      stacklevel=2)
        h_inv, damp_used = torch.eye(cols, device=w.device), None  # no error propagation = RTN
    else:
        h_inv, damp_used = factored
    groups = 1 if group_size is None else -(-cols // group_size)
    if static or group_size is None:
        scale, zero = fixed_scale, fixed_zero
    else:
        scale = torch.empty(out, groups, dtype=scale_dtype, device=w.device)
        zero = None if symmetric else torch.empty(out, groups, dtype=torch.int8, device=w.device)
    codes = torch.empty(out, cols, dtype=torch.int8, device=w.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        w_block = w[:, start:end].clone()
        h_block = h_inv[start:end, start:end]
        errors = torch.zeros_like(w_block)
        for i in range(end - start):
            column = int(perm[start + i])  # original column index
            group = 0 if group_size is None else column // group_size
            if not static and group_size is not None and column % group_size == 0:
                pending = torch.cat([w_block[:, i:], w[:, end:]], dim=1)[:, :group_size]  # natural order here
                group_scale, group_zero = group_params(pending, bits, None, symmetric, scale_dtype=scale_dtype)
                scale[:, group] = group_scale[:, 0]
                if zero is not None:
                    zero[:, group] = group_zero[:, 0]
            s = scale[:, group].float()
            z = zero[:, group].float() if zero is not None else 0.0
            q = torch.clamp(torch.round(w_block[:, i] / s) + z, low, high)
            codes[:, start + i] = q.to(torch.int8)
            dequantized = (q - z) * s
            error = (w_block[:, i] - dequantized) / h_block[i, i]
            w_block[:, i:] -= error[:, None] * h_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    inverse = torch.argsort(perm)
    return codes[:, inverse], scale, zero, {"damp": damp_used, "fallback": factored is None}


# --- model walking -------------------------------------------------------------------------------


@register(GPTQConfig, needs_calibration=True, resumable=True)
def gptq(model: nn.Module, config: GPTQConfig, calib: torch.Tensor,
         checkpoint: calibration.WalkCheckpoint | None = None) -> nn.Module:
    """Quantize every block linear of ``model`` in place with GPTQ on ``calib`` tokens, one block at a time.

    The quantized block's outputs feed the next block, so later blocks see (and correct for) the error
    of earlier ones. With a ``checkpoint``, each finished block is saved and an interrupted run resumes.
    """
    require_unquantized(model, "gptq")
    record = get_record(model)
    tokens = calibration.cap_length(calib, config.max_seq_len)
    spec = get_spec(model)
    fallbacks = record.metrics["gptq_rtn_fallbacks"] = []  # filled block by block: a resumed walk restores it
    for layer in calibration.layerwise(model, tokens, config.batch_size, config.device, desc="gptq",
                                       checkpoint=checkpoint):
        targets = block_targets(model, layer.index, layer.block, config.skip)
        groups = [[n for n in group if n in targets] for group in spec.input_groups()]
        groups = [g for g in groups if g]
        stats = calibration.observe_inputs(layer, {g[0]: targets[g[0]] for g in groups}, calibration.gram_reduce)
        for group in groups:
            gram, count = stats[group[0]]
            gram = calibration.shrink_gram(gram, config.gram_shrink)
            for name in group:
                path = f"{spec.layers}.{layer.index}.{name}"
                codes, scale, zero, info = gptq_quantize(
                    weight_out_in(targets[name]), gram * (2.0 / count), config.bits, config.group_size,
                    config.symmetric, config.block_size, config.damp, config.act_order, what=path,
                    clip=config.clip_search())
                if info["fallback"]:
                    fallbacks.append(path)
                replace_with_weight_only(model, layer.index, layer.block, name, codes, scale, zero, config)
        del stats
    return model
