"""Int8 quantization math (pure tensor functions) and the W8A8Linear module that stores real int8.

Symmetric int8 everywhere: ``q = clamp(round(x / scale), -127, 127)`` with ``scale = max|x| / 127``.
Weights: one scale per output channel. Activations: one scale per token (dynamic, computed at run time)
or one per tensor (static, from calibration). The matmul runs int8 × int8 → int32 and is rescaled by
``act_scale * weight_scale`` (SmoothQuant, Xiao et al. 2023, §3 "W8A8 quantization").
"""

from __future__ import annotations

import torch
from torch import nn

INT8_MAX = 127
_TINY = 1e-8  # floor for scales of all-zero rows/tokens, so dequantization never divides by zero


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight → int8 weight (out, in) and float32 scale (out,)."""
    scale = (weight.detach().abs().amax(dim=1).float() / INT8_MAX).clamp(min=_TINY)  # (out,)
    q = torch.round(weight.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, in) float activations → int8 (tokens, in) and float32 scale (tokens, 1)."""
    scale = (x.detach().abs().amax(dim=1, keepdim=True).float() / INT8_MAX).clamp(min=_TINY)
    q = torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float activations → int8 with one given float32 scale (static quantization; clamps outliers)."""
    return torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def _int_mm_supported(x_q: torch.Tensor, weight_q: torch.Tensor) -> bool:
    if x_q.device.type == "cpu":
        return True
    if x_q.device.type == "cuda":  # cuBLASLt int8 GEMM shape rules
        m, k = x_q.shape
        return m > 16 and k % 8 == 0 and weight_q.shape[0] % 8 == 0
    return False


def int8_matmul(x_q: torch.Tensor, weight_q: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (N, K)ᵀ → int32 (M, N), exact.

    Uses ``torch._int_mm`` where the device and shape allow it; elsewhere an exact float64 reference
    (every product and partial sum of int8 values is an integer below 2**53).
    """
    if _int_mm_supported(x_q, weight_q):
        return torch._int_mm(x_q, weight_q.t())
    return (x_q.double() @ weight_q.double().t()).to(torch.int32)


def int8_matmul_ref(x_q: torch.Tensor, weight_q: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`int8_matmul` in int64 arithmetic."""
    return (x_q.long() @ weight_q.long().t()).to(torch.int32)


class W8A8Linear(nn.Module):
    """A linear layer with int8 weights (per output channel) and int8 activations.

    Buffers: ``weight`` int8 (out, in), ``weight_scale`` float32 (out,), optional ``bias`` (float),
    and for static activation quantization ``input_scale`` float32 (one value).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, act_quant: str = "dynamic",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if act_quant not in ("dynamic", "static"):
            raise ValueError(f"act_quant must be 'dynamic' or 'static', got {act_quant!r}")
        self.in_features, self.out_features, self.act_quant = in_features, out_features, act_quant
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32) if act_quant == "static" else None)

    @classmethod
    def from_float(cls, weight_out_in: torch.Tensor, bias: torch.Tensor | None, act_quant: str,
                   input_abs_max: torch.Tensor | None = None) -> "W8A8Linear":
        """Quantize a float (out, in) weight; static quantization needs the calibrated input max."""
        out_features, in_features = weight_out_in.shape
        dtype = bias.dtype if bias is not None else weight_out_in.dtype
        module = cls(in_features, out_features, bias is not None, act_quant, dtype=dtype)
        module.weight, module.weight_scale = quantize_per_channel(weight_out_in)
        if bias is not None:
            module.bias = bias.detach().clone()
        if act_quant == "static":
            if input_abs_max is None:
                raise ValueError("static activation quantization needs input_abs_max from calibration")
            module.input_scale = (input_abs_max.max().float() / INT8_MAX).clamp(min=_TINY).reshape(())
        return module.to(weight_out_in.device)

    def layout(self) -> dict:
        """What the checkpoint manifest needs to rebuild this module before loading its tensors."""
        return {"type": "W8A8Linear", "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "act_quant": self.act_quant}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (tokens, in)
        if self.act_quant == "dynamic":
            x_q, x_scale = quantize_per_token(x2)
        else:
            x_q, x_scale = quantize_per_tensor(x2, self.input_scale), self.input_scale
        acc = int8_matmul(x_q, self.weight)  # (tokens, out) int32
        out = acc.float() * x_scale * self.weight_scale  # dequantize
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act_quant={self.act_quant}"
