"""Group-wise integer weight quantization math (pure tensor functions), shared by RTN, GPTQ and AWQ.

A weight (out, in) is cut along its input dimension into groups of ``group_size`` columns (``None``: one
group per output channel). Each (row, group) has a scale and, when asymmetric, a zero point. Codes are
signed integers in ``[-2**(bits-1), 2**(bits-1) - 1]`` and dequantize as ``(q - zero) * scale``:

- symmetric: ``scale = max|w| / (2**(bits-1) - 0.5)`` (half the code range, as compressed-tensors
  does), zero = 0: ±max|w| map to ±7.5 for int4, so the negative end uses code -8 and the positive end
  is clipped by half a step. On SmolLM2 (W4 g64 RTN, plain ranges) this gives +44% perplexity instead
  of +59% with ``max|w| / 7``, which leaves code -8 unused. The clipping searches of GPTQ and AWQ pick
  per (row, group) among these two ranges, one between them and narrower ones (:func:`search_clip`,
  :func:`widening`); RTN among the first three, by the weight error;
- asymmetric: ``scale = (max(w, 0) - min(w, 0)) / (2**bits - 1)``, ``zero = round(q_min - min / scale)``,
  so that 0 is exactly representable. The rounded zero point shifts the grid by up to half a step, so
  one end may clip by that much; the one-sided clipping searches, and RTN by the weight error alone, may
  widen the range by up to a step.

When ``group_size`` does not divide the width, the last group is partial (SmolLM2's 576 = 4·128 + 64):
its parameters come from its real columns only. Scales are stored in float16 (what vLLM and the packed
kernels read); codes are computed with the stored, rounded scale so dequantization is exact on reload.

Int4 codes are packed two per byte along the input dimension: byte ``j`` of a row holds column ``2j`` in
its low nibble and ``2j + 1`` in its high nibble, each as ``q + 8`` (0..15); an odd width pads with 8 (0).
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
_MIN_SCALE = 1e-6  # floor for all-zero groups (above float16's smallest subnormal)


def qrange(bits: int) -> tuple[int, int]:
    """(lowest, highest) signed code of a ``bits``-wide integer."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def num_groups(in_features: int, group_size: int | None) -> int:
    """Groups per row: ``ceil(in / group_size)``, or 1 for per-channel quantization."""
    return 1 if group_size is None else -(-in_features // group_size)


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, in) → (out, G, g), zero-padding a partial last group (zero is inside every range)."""
    out, width = weight.shape
    size = width if group_size is None else group_size
    groups = num_groups(width, group_size)
    padded = torch.nn.functional.pad(weight.float(), (0, groups * size - width))
    return padded.view(out, groups, size)


def expand_groups(params: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """(out, G) per-group values → (out, in) per-column values."""
    size = in_features if group_size is None else group_size
    return params.repeat_interleave(size, dim=1)[:, :in_features]


def group_params(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                 clip: torch.Tensor | float | tuple = 1.0, scale_dtype: torch.dtype = SCALE_DTYPE
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (out, G) in ``scale_dtype`` and zero point (out, G) int8 (None when symmetric) of ``weight``.

    ``clip`` shrinks the range (a float, or one ratio per (out, G)): the clipping searches pick it. When
    asymmetric, it may be a (low, high) pair that shrinks the two ends of each range separately.
    """
    low, high = qrange(bits)
    grouped = _grouped(weight, group_size)  # (out, G, g)
    if symmetric:
        if isinstance(clip, tuple):
            raise ValueError("a (low, high) clipping pair needs asymmetric quantization")
        scale = grouped.abs().amax(dim=2) * clip / ((high - low) / 2)
        return scale.clamp(min=_MIN_SCALE).to(scale_dtype), None
    clip_low, clip_high = clip if isinstance(clip, tuple) else (clip, clip)
    w_min = grouped.amin(dim=2).clamp(max=0) * clip_low
    w_max = grouped.amax(dim=2).clamp(min=0) * clip_high
    scale = ((w_max - w_min) / (high - low)).clamp(min=_MIN_SCALE).to(scale_dtype)
    zero = torch.round(low - w_min / scale.float()).clamp(low, high).to(torch.int8)
    return scale, zero


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                   group_size: int | None) -> torch.Tensor:
    """Integer codes (out, in) int8 of ``weight`` for the given group parameters."""
    low, high = qrange(bits)
    width = weight.shape[1]
    scales = expand_groups(scale.float(), width, group_size)
    q = torch.round(weight.float() / scales)
    if zero is not None:
        q = q + expand_groups(zero.float(), width, group_size)
    return q.clamp(low, high).to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int | None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float weight (out, in) from codes and group parameters: ``(q - zero) * scale``."""
    width = codes.shape[1]
    q = codes.float()
    if zero is not None:
        q = q - expand_groups(zero.float(), width, group_size)
    return (q * expand_groups(scale.float(), width, group_size)).to(dtype)


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                  clip: torch.Tensor | float | tuple = 1.0) -> torch.Tensor:
    """Round-to-nearest quantize then dequantize (float32), for error searches (AWQ, mixed precision)."""
    scale, zero = group_params(weight, bits, group_size, symmetric, clip)
    return dequantize(quantize_codes(weight, scale, zero, bits, group_size), scale, zero, group_size)


def group_output_errors(diff: torch.Tensor, gram: torch.Tensor | None, group_size: int | None) -> torch.Tensor:
    """Output error per (row, group), (out, G): each group's columns against its diagonal block of the Gram.

    ``gram=None`` scores the weight error itself (its squared sum per group), for data-free choices (RTN).
    """
    if gram is None:
        return _grouped(diff * diff, group_size).sum(dim=2)
    width = diff.shape[1]
    size = width if group_size is None else group_size
    errors = []
    for start in range(0, width, size):
        block = slice(start, min(start + size, width))
        d = diff[:, block]
        errors.append(((d @ gram[block, block]) * d).sum(dim=1))
    return torch.stack(errors, dim=1)


def widening(bits: int, symmetric: bool) -> list[float]:
    """Ratios above 1 that a one-sided clipping search also tries, because the plain range may clip:

    - symmetric: ``max|w| / 7.5`` (int4) leaves a positive maximum half a step short of code 7. The
      ratios go halfway, and all the way, to the range whose top code ``2**(bits-1) - 1`` lands exactly
      on max|w| (7.5 / 7 for int4).
    - asymmetric: rounding the zero point shifts the grid by up to half a step, so one end may clip by
      that much. The ratios widen the range by half a step and by a whole one (15.5 / 15, 16 / 15), the
      latter room for any shift.

    Measured on SmolLM2 W4, calibrated on Shakespeare, perplexity rise (Shakespeare / python-docs,
    ``scripts/compare_quant.py``): symmetric AWQ g128 +23.1% / +25.0% → +20.0% / +21.9%, GPTQ g64 +6.3% /
    +15.1% → +5.7% / +13.1%; asymmetric AWQ g64 +10.2% / +13.1% → +9.6% / +12.8%, GPTQ g64 +5.1% /
    +11.9% → +4.6% / +10.4%, with mixed calibration +5.6% / +7.8% → +4.7% / +7.1%.
    """
    low, high = qrange(bits)
    full = (high - low) / 2 / high if symmetric else (high - low + 1) / (high - low)
    return [(1.0 + full) / 2, full]


def search_clip(weight: torch.Tensor, gram: torch.Tensor | None, bits: int, group_size: int | None, symmetric: bool,
                max_shrink: float, grid: int, two_sided: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Clipping ratio per (row, group), (out, G), minimising each group's output error through ``gram``
    (XᵀX for AWQ's and GPTQ's searches; None: the weight error itself, RTN's widening), over ratios
    ``1, 1 - max_shrink/grid, ..., 1 - max_shrink·(grid-1)/grid``.

    It also tries the :func:`widening` ratios above 1: the plain range clips one end by up to half a step
    (symmetric: the positive end; asymmetric: whichever the rounded zero point shifts past), and a group
    whose clipped weight meets a loud input does better without that.

    ``two_sided`` (asymmetric only): a (low, high) pair of ratios per (row, group) instead, each end of the
    range over ``max(grid // 2, 1)`` ratios from 1 down to the same depth, every pair tried. It does not
    widen: on SmolLM2 W4 g128 AWQ (mixed calibration, 20 × 20 pairs) widened pairs were worse in both
    domains.
    """
    if two_sided and symmetric:
        raise ValueError("a two-sided clipping search needs asymmetric quantization")
    w = weight.float()
    steps = max(grid // 2, 1) if two_sided else grid
    ratios = [1.0 - max_shrink * step / steps for step in range(steps)]
    if not two_sided:
        ratios += widening(bits, symmetric)
    candidates = [(lo, hi) for lo in ratios for hi in ratios] if two_sided else ratios
    best_error = torch.full((w.shape[0], num_groups(w.shape[1], group_size)), float("inf"), device=w.device)
    best = torch.zeros_like(best_error, dtype=torch.long)  # index into candidates, per (row, group)
    for index, clip in enumerate(candidates):
        errors = group_output_errors(w - fake_quantize(w, bits, group_size, symmetric, clip), gram, group_size)
        better = errors < best_error
        best_error = torch.where(better, errors, best_error)
        best = torch.where(better, index, best)
    chosen = torch.tensor(candidates, dtype=torch.float32, device=w.device)[best]  # (out, G) or (out, G, 2)
    return (chosen[..., 0], chosen[..., 1]) if two_sided else chosen


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes (out, in) in [-8, 7] → uint8 (out, ceil(in / 2)), two codes a byte (low nibble first)."""
    unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)
    if unsigned.shape[1] % 2:
        unsigned = torch.nn.functional.pad(unsigned, (0, 1), value=8)
    return unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (out, ceil(in / 2)) → int8 codes (out, in)."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=2).reshape(packed.shape[0], -1)[:, :in_features]
